//! Elementwise ops (DropoutOps, ResidualOps, OptimizerOps) and Memory, on views in the middle
//! of larger buffers, so that a write outside the view shows up as an error; gradient clipping
//! on a whole buffer, with the norm above and below the maximum. Also `run_ops`:
//! every op case of every family, in the fixed order in which their inputs are drawn from the
//! seed.

use kernels::{AdamW, AttentionShape, Backend, GemmShape, Operand};

use super::attention::{AttentionCase, CrossEntropyCase};
use super::linear::{AddBiasCase, BiasGradCase, GemmCase};
use super::norm_act::{EmbeddingCase, GeluCase, LayerNormCase};
use super::{Case, Check, Draw, Outputs, Tolerances, check_case, get};

const PAD_LO: usize = 5;
const PAD_HI: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Elem {
    DropoutForward { p: f32, seed: u64 },
    DropoutBackward { p: f32, seed: u64 },
    Add,
    AddAssign,
    Scale(f32),
    AdamW(AdamW),
    SumSquares,
    Fill(f32),
    Copy,
    ViewMut2,
}

struct ElemCase {
    what: Elem,
    n: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    z: Vec<f32>,
    w: Vec<f32>,
}

impl ElemCase {
    fn new(r: &mut Draw, what: Elem, n: usize) -> Self {
        let len = PAD_LO + n + PAD_HI;
        let (x, y, z) = (r.normal(len, 1.0), r.normal(len, 1.0), r.normal(len, 0.1));
        // AdamW's second moment is non-negative.
        let w = r.uniform(len, 1e-4, 0.02);
        ElemCase { what, n, x, y, z, w }
    }
    fn mid(&self) -> std::ops::Range<usize> {
        PAD_LO..PAD_LO + self.n
    }
}

impl Case for ElemCase {
    fn family(&self) -> &'static str {
        match self.what {
            Elem::DropoutForward { .. } | Elem::DropoutBackward { .. } => "DropoutOps",
            Elem::Add | Elem::AddAssign | Elem::Scale(_) => "ResidualOps",
            Elem::AdamW(_) | Elem::SumSquares => "OptimizerOps",
            Elem::Fill(_) | Elem::Copy | Elem::ViewMut2 => "Memory",
        }
    }
    fn op(&self) -> &'static str {
        match self.what {
            Elem::DropoutForward { .. } => "dropout_forward",
            Elem::DropoutBackward { .. } => "dropout_backward",
            Elem::Add => "add",
            Elem::AddAssign => "add_assign",
            Elem::Scale(_) => "scale",
            Elem::AdamW(_) => "adamw",
            Elem::SumSquares => "sum_squares",
            Elem::Fill(_) => "fill",
            Elem::Copy => "copy",
            Elem::ViewMut2 => "view_mut2",
        }
    }
    fn shape(&self) -> String {
        let what = match self.what {
            Elem::DropoutForward { p, .. } | Elem::DropoutBackward { p, .. } => format!(" p{p}"),
            Elem::Scale(s) => format!(" x{s}"),
            Elem::AdamW(h) => format!(" step{} wd{}", h.step, h.weight_decay),
            _ => String::new(),
        };
        format!("{} at +{PAD_LO}{what}", self.n)
    }
    fn tol(&self) -> f64 {
        match self.what {
            Elem::AdamW(_) | Elem::SumSquares => 1e-5,
            Elem::Fill(_) | Elem::Copy | Elem::ViewMut2 => 0.0,
            _ => 1e-6,
        }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mid = self.mid();
        let mut x = d.upload(&self.x)?;
        let mut y = d.upload(&self.y)?;
        match self.what {
            Elem::DropoutForward { p, seed } => d.dropout_forward(d.view_mut(&mut x, mid), p, seed)?,
            Elem::DropoutBackward { p, seed } => d.dropout_backward(d.view_mut(&mut x, mid), p, seed)?,
            Elem::Add => {
                let z = d.upload(&self.z)?;
                d.add(d.view(&y, mid.clone()), d.view(&z, mid.clone()), d.view_mut(&mut x, mid))?;
            }
            Elem::AddAssign => d.add_assign(d.view_mut(&mut x, mid.clone()), d.view(&y, mid))?,
            Elem::Scale(s) => d.scale(d.view_mut(&mut x, mid), s)?,
            Elem::AdamW(h) => {
                // params x, grads z, moments y (m) and w (v).
                let g = d.upload(&self.z)?;
                let mut v = d.upload(&self.w)?;
                d.adamw(
                    h,
                    d.view_mut(&mut x, mid.clone()),
                    d.view(&g, mid.clone()),
                    d.view_mut(&mut y, mid.clone()),
                    d.view_mut(&mut v, mid),
                )?;
                return Ok(vec![("params", get(d, &x)?), ("m", get(d, &y)?), ("v", get(d, &v)?)]);
            }
            Elem::SumSquares => {
                let s = d.sum_squares(d.view(&x, mid))?;
                return Ok(vec![("sum", vec![s as f32])]);
            }
            Elem::Fill(v) => d.fill(d.view_mut(&mut x, mid), v)?,
            Elem::Copy => d.copy(d.view(&y, mid.clone()), d.view_mut(&mut x, mid))?,
            Elem::ViewMut2 => {
                // Two disjoint views, the second before the first: copy one into the other
                // through `as_ref`, then fill the source.
                let h = self.n / 2;
                let (a, b) = (PAD_LO + h..PAD_LO + 2 * h, PAD_LO..PAD_LO + h);
                let (ma, mb) = d.view_mut2(&mut x, a, b);
                d.copy(d.as_ref(&ma), mb)?;
                d.fill(ma, -2.5)?;
                let z = d.zeros(7)?;
                return Ok(vec![("x", get(d, &x)?), ("zeros", get(d, &z)?)]);
            }
        }
        Ok(vec![("x", get(d, &x)?)])
    }
}

/// Gradient clipping as training does it (`kernels::clip_grad_norm`: the global norm from
/// `sum_squares`, read back to the host, then `scale` when it is above the maximum): the norm
/// it returns and the gradients it leaves. The buffer is the whole gradient, as in training.
struct ClipCase {
    /// `max_norm` below the inputs' norm (the gradients are scaled) or above it (left alone).
    above: bool,
    max_norm: f32,
    grads: Vec<f32>,
}

impl ClipCase {
    fn new(r: &mut Draw, n: usize, above: bool) -> Self {
        let grads = r.normal(n, 1.0);
        let norm = grads.iter().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt() as f32;
        // Far enough from the norm that rounding cannot flip the case.
        let max_norm = if above { 0.5 * norm } else { 2.0 * norm };
        ClipCase { above, max_norm, grads }
    }
}

impl Case for ClipCase {
    fn family(&self) -> &'static str {
        "OptimizerOps"
    }
    fn op(&self) -> &'static str {
        if self.above { "clip_grad_norm_above" } else { "clip_grad_norm_below" }
    }
    fn shape(&self) -> String {
        format!("{} max {:.1}", self.grads.len(), self.max_norm)
    }
    fn tol(&self) -> f64 {
        // A sum of squares in fp32 on every backend (like `sum_squares`); no GEMM involved.
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mut g = d.upload(&self.grads)?;
        let norm = kernels::clip_grad_norm(d, &mut g, self.max_norm)?;
        Ok(vec![("norm", vec![norm]), ("grads", get(d, &g)?)])
    }
}

/// Every op case, with fresh inputs from `seed`.
pub(super) fn run_ops<B: Backend>(dev: &B, seed: u64, tol: Tolerances) -> Vec<Check> {
    let mut r = Draw { seed, stream: 0 };
    let mut out = Vec::new();

    // GEMM: the four transpose combinations with non-zero C (beta != 0), then batched strided
    // products laid out as attention uses them (heads interleaved in the rows of q and k).
    let (m, n, k) = (1023, 97, 389);
    for (label, ta, tb) in
        [("gemm_nn", false, false), ("gemm_nt", false, true), ("gemm_tn", true, false), ("gemm_tt", true, true)]
    {
        let op_a = if ta { Operand::t(m) } else { Operand::n(k) };
        let op_b = if tb { Operand::t(k) } else { Operand::n(n) };
        let c = GemmCase::new(&mut r, label, tol.gemm, GemmShape::plain(m, n, k), op_a, op_b, 0, 0.75, 0.5);
        check_case(&mut out, dev, &c);
    }
    let small = GemmCase::new(
        &mut r,
        "gemm_nt",
        tol.gemm,
        GemmShape::plain(37, 20, 7),
        Operand::n(7),
        Operand::t(7),
        11,
        1.0,
        1.0,
    );
    check_case(&mut out, dev, &small);
    // q [tq, H*D] x k^T per head: strided rows, batch stride D, C with a padded row stride.
    let (heads, d, tq, tk) = (3, 7, 37, 29);
    let s = GemmShape { m: tq, n: tk, k: d, batch: heads, ldc: tk + 2, batch_stride_c: tq * (tk + 2) + 1 };
    let qk = GemmCase::new(
        &mut r,
        "gemm_batched",
        tol.gemm,
        s,
        Operand { trans: false, ld: heads * d, batch_stride: d },
        Operand { trans: true, ld: heads * d, batch_stride: d },
        3,
        0.4,
        0.0,
    );
    check_case(&mut out, dev, &qk);
    let s = GemmShape { m: tk, n: d, k: tq, batch: heads, ldc: d, batch_stride_c: tk * d };
    let pv = GemmCase::new(
        &mut r,
        "gemm_batched",
        tol.gemm,
        s,
        Operand { trans: true, ld: tk, batch_stride: tq * tk },
        Operand { trans: false, ld: heads * d, batch_stride: d },
        0,
        1.0,
        1.0,
    );
    check_case(&mut out, dev, &pv);
    for (rows, cols) in [(1023, 389), (37, 1001)] {
        let c = AddBiasCase { rows, cols, y: r.normal(rows * cols, 1.0), bias: r.normal(cols, 1.0) };
        check_case(&mut out, dev, &c);
        let c = BiasGradCase { rows, cols, dy: r.normal(rows * cols, 1.0), dbias0: r.normal(cols, 1.0) };
        check_case(&mut out, dev, &c);
    }

    // Embeddings: 1023 ids (forward: assigned and accumulated); backward with many repeats.
    let (rows, dim) = (1001, 389);
    for accumulate in [false, true] {
        let c = EmbeddingCase {
            backward: false,
            accumulate,
            rows,
            dim,
            ids: r.ids(1023, rows),
            table: r.normal(rows * dim, 1.0),
            x: r.normal(1023 * dim, 1.0),
        };
        check_case(&mut out, dev, &c);
    }
    let c = EmbeddingCase {
        backward: true,
        accumulate: true,
        rows,
        dim,
        ids: r.ids(1023, 37),
        table: r.normal(rows * dim, 1.0),
        x: r.normal(1023 * dim, 1.0),
    };
    check_case(&mut out, dev, &c);

    // LayerNorm (rows with mean 3, so the variance needs care), narrow and wide rows.
    for (rows, c) in [(1023, 389), (37, 20)] {
        check_case(&mut out, dev, &LayerNormCase::new(&mut r, rows, c, false, false));
        check_case(&mut out, dev, &LayerNormCase::new(&mut r, rows, c, true, false));
        check_case(&mut out, dev, &LayerNormCase::new(&mut r, rows, c, true, true));
    }

    // Bias + GELU.
    for backward in [false, true] {
        let (rows, c) = (1023, 389);
        let g = GeluCase {
            backward,
            rows,
            c,
            pre: r.normal(rows * c, 2.0),
            bias: r.normal(c, 0.5),
            dout: r.normal(rows * c, 1.0),
            garbage: r.normal(rows * c, 5.0),
            dbias0: r.normal(c, 1.0),
        };
        check_case(&mut out, dev, &g);
    }

    // Attention: cross-attention shape with key padding (the third item fully masked), causal
    // self-attention, dropout on the probabilities (same seed, same mask by contract), and a
    // BERT-sized head dimension.
    let shape = |batch, heads, head_dim, tq, tk, causal, dropout: f32, seed| AttentionShape {
        batch,
        heads,
        head_dim,
        tq,
        tk,
        causal,
        dropout,
        seed,
    };
    let drop_seed = r.next();
    let cases: [(&str, AttentionShape, &[usize]); 4] = [
        ("attention_padded", shape(3, 3, 7, 37, 29, false, 0.0, 0), &[0, 10, 29]),
        ("attention_causal", shape(2, 3, 7, 130, 130, true, 0.0, 0), &[0, 17]),
        ("attention_dropout", shape(2, 3, 7, 67, 67, false, 0.1, drop_seed), &[3, 0]),
        ("attention_d64", shape(2, 2, 64, 131, 131, true, 0.1, drop_seed ^ 1), &[0, 5]),
    ];
    for (label, s, masked) in cases {
        check_case(&mut out, dev, &AttentionCase::new(&mut r, label, s, masked, false, tol));
        check_case(&mut out, dev, &AttentionCase::new(&mut r, label, s, masked, true, tol));
    }

    // Cross-entropy: ignored rows, label smoothing, with and without the gradient, and a
    // BERT-sized vocabulary.
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 37, 1001, 0.1, false));
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 37, 1001, 0.1, true));
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 37, 1001, 0.0, true));
    check_case(&mut out, dev, &CrossEntropyCase::new(&mut r, 7, 30522, 0.1, true));

    // Elementwise and memory ops.
    let n = 1023 * 389 + 7;
    let seed_d = r.next();
    let h1 = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 };
    let h7 = AdamW { step: 7, weight_decay: 0.0, ..h1 };
    for what in [
        Elem::DropoutForward { p: 0.1, seed: seed_d },
        Elem::DropoutBackward { p: 0.1, seed: seed_d },
        Elem::DropoutForward { p: 0.5, seed: seed_d ^ 3 },
        Elem::Add,
        Elem::AddAssign,
        Elem::Scale(0.37),
        Elem::AdamW(h1),
        Elem::AdamW(h7),
        Elem::SumSquares,
        Elem::Fill(1.25),
        Elem::Copy,
        Elem::ViewMut2,
    ] {
        check_case(&mut out, dev, &ElemCase::new(&mut r, what, n));
    }
    // Gradient clipping, both ways (drawn last, so the earlier cases keep their inputs per seed).
    for above in [true, false] {
        check_case(&mut out, dev, &ClipCase::new(&mut r, n, above));
    }
    out
}
