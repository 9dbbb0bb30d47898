//! Every op case of every family, in the fixed order in which their inputs are drawn from the
//! seed (so a seed replays the same inputs): GEMMs and biases, embeddings, LayerNorm and GELU,
//! attention, cross-entropy, the elementwise, optimizer and memory ops, then residual + dropout
//! + LayerNorm (drawn after the others, which kept their inputs per seed when it came).

use kernels::{AdamW, AttentionShape, Backend, GemmShape, Operand};

use crate::attention::{AttentionCase, CrossEntropyCase};
use crate::elementwise::{AdamWFlatCase, ClipCase, Elem, ElemCase};
use crate::linear::{AddBiasCase, BiasGradCase, GemmCase, LinearEpilogueCase};
use crate::norm_act::{EmbeddingCase, GeluCase, LayerNormCase, ResidualNormCase};
use crate::{Case, Check, Draw, Reference, Tolerances, check_case};

/// Runs cases on one backend against one reference, collecting the checks.
struct Runner<'a, B> {
    dev: &'a B,
    oracle: Reference,
    tol: Tolerances,
    r: Draw,
    out: Vec<Check>,
}

impl<B: Backend> Runner<'_, B> {
    fn check<C: Case>(&mut self, case: &C) {
        check_case(&mut self.out, self.dev, self.oracle, case, self.tol.storage);
    }
}

/// Every op case, with fresh inputs from `seed`.
pub(crate) fn run_ops<B: Backend>(dev: &B, oracle: Reference, seed: u64, tol: Tolerances) -> Vec<Check> {
    let mut run = Runner { dev, oracle, tol, r: Draw::new(seed, dev.activation_dtype()), out: Vec::new() };
    gemm_cases(&mut run);
    embedding_cases(&mut run);
    norm_and_gelu_cases(&mut run);
    attention_cases(&mut run);
    cross_entropy_cases(&mut run);
    elementwise_cases(&mut run);
    residual_norm_cases(&mut run);
    linear_epilogue_cases(&mut run);
    run.out
}

/// Linear layers through the fused-epilogue GEMMs, forward and backward, on a shape with no
/// dimension a multiple of a tile (drawn last, so earlier cases keep their inputs per seed).
fn linear_epilogue_cases<B: Backend>(run: &mut Runner<'_, B>) {
    for backward in [false, true] {
        let (rows, in_dim, out_dim) = (259, 97, 131);
        let c = LinearEpilogueCase {
            backward,
            rows,
            in_dim,
            out_dim,
            x: run.r.normal(rows * in_dim, 1.0),
            w: run.r.normal(out_dim * in_dim, 1.0),
            bias: run.r.normal(out_dim + 3, 1.0),
            dy: run.r.normal(rows * out_dim, 1.0),
            stale: run.r.normal(3 + out_dim + out_dim * in_dim, 1.0),
            tol: run.tol.gemm,
        };
        run.check(&c);
    }
    // AdamW refreshing the bf16 weight copy (a mixed-precision device only: the CPU and fp32
    // devices have no copy; the CPU's copy path has its own unit test).
    if run.dev.activation_dtype() == kernels::Dtype::Bf16 {
        let case = AdamWFlatCase::new(&mut run.r, 200_003, true).with_copy(&mut run.r);
        run.check(&case);
    }
    // The bias-free GELU of a linear whose bias the GEMM added.
    for backward in [false, true] {
        let (rows, c) = (259, 131);
        let r = &mut run.r;
        let g = GeluCase {
            backward,
            plain: true,
            rows,
            c,
            pre: r.normal(rows * c, 2.0),
            bias: Vec::new(),
            dout: r.normal(rows * c, 1.0),
            garbage: r.normal(rows * c, 5.0),
            dbias0: Vec::new(),
        };
        run.check(&g);
    }
}

/// GEMM: the four transpose combinations with non-zero C (beta != 0), a small product reading A
/// from a view, then batched strided products laid out as attention uses them (heads
/// interleaved in the rows of q and k); bias add and bias gradient.
fn gemm_cases<B: Backend>(run: &mut Runner<'_, B>) {
    let tol = run.tol.gemm;
    let (m, n, k) = (1023, 97, 389);
    for (label, ta, tb) in
        [("gemm_nn", false, false), ("gemm_nt", false, true), ("gemm_tn", true, false), ("gemm_tt", true, true)]
    {
        let op_a = if ta { Operand::t(m) } else { Operand::n(k) };
        let op_b = if tb { Operand::t(k) } else { Operand::n(n) };
        let c = GemmCase::new(&mut run.r, label, tol, GemmShape::plain(m, n, k), op_a, op_b, 0, 0.75, 0.5);
        run.check(&c);
    }
    let shape = GemmShape::plain(37, 20, 7);
    let small = GemmCase::new(&mut run.r, "gemm_nt", tol, shape, Operand::n(7), Operand::t(7), 11, 1.0, 1.0);
    run.check(&small);
    // dW += dy^T x: bf16 activations into an fp32 gradient on a mixed-precision device.
    let grad =
        GemmCase::new(&mut run.r, "", tol, GemmShape::plain(97, 45, 131), Operand::t(97), Operand::n(45), 0, 1.0, 1.0);
    run.check(&grad.into_param_grad());
    // q [tq, H*D] x k^T per head: strided rows, batch stride D, C with a padded row stride.
    let (heads, d, tq, tk) = (3, 7, 37, 29);
    let s = GemmShape { m: tq, n: tk, k: d, batch: heads, ldc: tk + 2, batch_stride_c: tq * (tk + 2) + 1 };
    let (op_q, op_k) = (
        Operand { trans: false, ld: heads * d, batch_stride: d },
        Operand { trans: true, ld: heads * d, batch_stride: d },
    );
    let qk = GemmCase::new(&mut run.r, "gemm_batched", tol, s, op_q, op_k, 3, 0.4, 0.0);
    run.check(&qk);
    let s = GemmShape { m: tk, n: d, k: tq, batch: heads, ldc: d, batch_stride_c: tk * d };
    let (op_p, op_v) = (
        Operand { trans: true, ld: tk, batch_stride: tq * tk },
        Operand { trans: false, ld: heads * d, batch_stride: d },
    );
    let pv = GemmCase::new(&mut run.r, "gemm_batched", tol, s, op_p, op_v, 0, 1.0, 1.0);
    run.check(&pv);
    for (rows, cols) in [(1023, 389), (37, 1001)] {
        let c = AddBiasCase { rows, cols, y: run.r.normal(rows * cols, 1.0), bias: run.r.normal(cols, 1.0) };
        run.check(&c);
        let c = BiasGradCase { rows, cols, dy: run.r.normal(rows * cols, 1.0), dbias0: run.r.normal(cols, 1.0) };
        run.check(&c);
    }
    // AdamW refreshing the bf16 weight copy (a mixed-precision device only: the CPU and fp32
    // devices have no copy; the CPU's copy path has its own unit test).
    if run.dev.activation_dtype() == kernels::Dtype::Bf16 {
        let case = AdamWFlatCase::new(&mut run.r, 200_003, true).with_copy(&mut run.r);
        run.check(&case);
    }
    // The bias-free GELU of a linear whose bias the GEMM added.
    for backward in [false, true] {
        let (rows, c) = (259, 131);
        let r = &mut run.r;
        let g = GeluCase {
            backward,
            plain: true,
            rows,
            c,
            pre: r.normal(rows * c, 2.0),
            bias: Vec::new(),
            dout: r.normal(rows * c, 1.0),
            garbage: r.normal(rows * c, 5.0),
            dbias0: Vec::new(),
        };
        run.check(&g);
    }
}

/// Embeddings: 1023 ids (forward: assigned and accumulated); backward with many repeats; then
/// the same ops as a gather and a scatter of activation rows (ids drawn from all rows, so few
/// repeat: a bf16 scatter rounds after every add).
fn embedding_cases<B: Backend>(run: &mut Runner<'_, B>) {
    let (rows, dim) = (1001, 389);
    for (backward, accumulate, rows_of_activations) in
        [(false, false, false), (false, true, false), (true, true, false), (false, true, true), (true, true, true)]
    {
        // The parameter backward draws its ids from the first 37 rows, so that most repeat.
        let ids = run.r.ids(1023, if backward && !rows_of_activations { 37 } else { rows });
        let c = EmbeddingCase {
            backward,
            accumulate,
            rows,
            dim,
            ids,
            table: run.r.normal(rows * dim, 1.0),
            x: run.r.normal(1023 * dim, 1.0),
            rows_of_activations,
        };
        run.check(&c);
    }
    // AdamW refreshing the bf16 weight copy (a mixed-precision device only: the CPU and fp32
    // devices have no copy; the CPU's copy path has its own unit test).
    if run.dev.activation_dtype() == kernels::Dtype::Bf16 {
        let case = AdamWFlatCase::new(&mut run.r, 200_003, true).with_copy(&mut run.r);
        run.check(&case);
    }
    // The bias-free GELU of a linear whose bias the GEMM added.
    for backward in [false, true] {
        let (rows, c) = (259, 131);
        let r = &mut run.r;
        let g = GeluCase {
            backward,
            plain: true,
            rows,
            c,
            pre: r.normal(rows * c, 2.0),
            bias: Vec::new(),
            dout: r.normal(rows * c, 1.0),
            garbage: r.normal(rows * c, 5.0),
            dbias0: Vec::new(),
        };
        run.check(&g);
    }
}

/// LayerNorm (rows with mean 3, so the variance needs care), narrow and wide rows; bias + GELU.
fn norm_and_gelu_cases<B: Backend>(run: &mut Runner<'_, B>) {
    for (rows, c) in [(1023, 389), (37, 20)] {
        for (backward, accumulate_dx) in [(false, false), (true, false), (true, true)] {
            let case = LayerNormCase::new(&mut run.r, rows, c, backward, accumulate_dx);
            run.check(&case);
        }
    }
    for backward in [false, true] {
        let (rows, c) = (1023, 389);
        let r = &mut run.r;
        let g = GeluCase {
            backward,
            plain: false,
            rows,
            c,
            pre: r.normal(rows * c, 2.0),
            bias: r.normal(c, 0.5),
            dout: r.normal(rows * c, 1.0),
            garbage: r.normal(rows * c, 5.0),
            dbias0: r.normal(c, 1.0),
        };
        run.check(&g);
    }
}

/// Attention: cross-attention shape with key padding (the third item fully masked), causal
/// self-attention, dropout on the probabilities (same seed, same mask by contract), and a
/// BERT-sized head dimension; forward and backward of each.
fn attention_cases<B: Backend>(run: &mut Runner<'_, B>) {
    let shape = |batch, heads, head_dim, tq, tk, causal, dropout: f32, seed| {
        AttentionShape::new(batch, heads, head_dim, tq, tk).with_causal(causal).with_dropout(dropout, seed)
    };
    let drop_seed = run.r.next();
    // q, k, v as column blocks of a fused [B, T, 3C] projection (C = 2 heads of 32).
    let fused = shape(2, 2, 32, 37, 37, true, 0.1, drop_seed ^ 2).with_strides(3 * 64, 3 * 64);
    let cases: [(&str, AttentionShape, &[usize]); 5] = [
        ("attention_padded", shape(3, 3, 7, 37, 29, false, 0.0, 0), &[0, 10, 29]),
        ("attention_causal", shape(2, 3, 7, 130, 130, true, 0.0, 0), &[0, 17]),
        ("attention_dropout", shape(2, 3, 7, 67, 67, false, 0.1, drop_seed), &[3, 0]),
        ("attention_d64", shape(2, 2, 64, 131, 131, true, 0.1, drop_seed ^ 1), &[0, 5]),
        ("attention_strided", fused, &[4, 37]),
    ];
    for (label, s, masked) in cases {
        for backward in [false, true] {
            let case = AttentionCase::new(&mut run.r, label, s, masked, backward, run.tol);
            run.check(&case);
        }
    }
}

/// Cross-entropy: ignored rows, label smoothing, with and without the gradient, and a
/// BERT-sized vocabulary.
fn cross_entropy_cases<B: Backend>(run: &mut Runner<'_, B>) {
    for (rows, vocab, ls, with_grad) in
        [(37, 1001, 0.1, false), (37, 1001, 0.1, true), (37, 1001, 0.0, true), (7, 30522, 0.1, true)]
    {
        let case = CrossEntropyCase::new(&mut run.r, rows, vocab, ls, with_grad);
        run.check(&case);
    }
}

/// Elementwise, optimizer and memory ops on a view inside a larger buffer, then gradient
/// clipping both ways (drawn last, so the earlier cases keep their inputs per seed).
fn elementwise_cases<B: Backend>(run: &mut Runner<'_, B>) {
    let n = 1023 * 389 + 7;
    let seed_d = run.r.next();
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
        Elem::ConvertCopy,
    ] {
        let case = ElemCase::new(&mut run.r, what, n);
        run.check(&case);
    }
    for above in [true, false] {
        let case = ClipCase::new(&mut run.r, n, above);
        run.check(&case);
    }
    for clipped in [true, false] {
        let case = AdamWFlatCase::new(&mut run.r, 1_000_003, clipped);
        run.check(&case);
    }
}

/// Residual + dropout + LayerNorm: widths not a multiple of 4 (scalar path) and BERT-like ones
/// (vector path, and scalar again on misaligned views), with and without dropout, forward and
/// backward with the skip gradient assigned and accumulated; 2113 rows of 20 are more than the
/// backward's 264 blocks of 8 warps hold at once, so warps loop over rows.
fn residual_norm_cases<B: Backend>(run: &mut Runner<'_, B>) {
    for (rows, c, p, offset) in
        [(37, 129, 0.1, 0), (37, 384, 0.0, 0), (37, 384, 0.1, 0), (37, 384, 0.1, 1), (2113, 20, 0.1, 0)]
    {
        for mode in [(false, false), (true, false), (true, true)] {
            let case = ResidualNormCase::new(&mut run.r, rows, c, p, offset, mode);
            run.check(&case);
        }
    }
}
