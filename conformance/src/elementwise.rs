//! Elementwise ops (DropoutOps, ResidualOps, OptimizerOps) and Memory, on views in the middle
//! of larger buffers, so that a write outside the view shows up as an error. Dropout, residual,
//! fill and copy run on activation buffers (`act`: bf16 on a mixed-precision device), AdamW and
//! the sum of squares on fp32 ones; a converting copy rounds fp32 into an activation buffer and
//! back, bit for bit as `kernels::round_bf16` when activations are bf16. Gradient clipping
//! on a whole buffer, with the norm above and below the maximum; the one-launch AdamW over a
//! flat buffer (`adamw_flat`) with odd decaying, non-decaying and skipped ranges, clipped or not.

use kernels::{AdamW, Backend, Dtype, FlatSegments, reference, rng};

use super::{Case, Draw, Outputs, act, get};

const PAD_LO: usize = 5;
const PAD_HI: usize = 3;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Elem {
    DropoutForward { p: f32, seed: u64 },
    DropoutBackward { p: f32, seed: u64 },
    Add,
    AddAssign,
    Scale(f32),
    AdamW(AdamW),
    SumSquares,
    Fill(f32),
    Copy,
    // fp32 -> activation dtype -> fp32 (a converting copy there and back).
    ConvertCopy,
    ViewMut2,
}

/// fp32 values a bf16 rounding must get exactly right, at the start of the converting copy's
/// view: ties to even either way (1 + 2^-8 down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6), a bit
/// either side of a tie, a negative tie, 0.1 (rounds up), -0.0, a subnormal tie (to 0x0002).
const ROUNDING_EDGES: [u32; 9] = [
    0x3f80_8000,
    0x3f81_8000,
    0x3f80_8001,
    0x3f81_7fff,
    0xbf80_8000,
    0x3dcc_cccd,
    0x8000_0000,
    0x0001_8000,
    0x0000_0001,
];

pub(crate) struct ElemCase {
    what: Elem,
    n: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    z: Vec<f32>,
    w: Vec<f32>,
}

impl ElemCase {
    pub(crate) fn new(r: &mut Draw, what: Elem, n: usize) -> Self {
        let len = PAD_LO + n + PAD_HI;
        let (x, y, z) = (r.normal(len, 1.0), r.normal(len, 1.0), r.normal(len, 0.1));
        // AdamW's second moment is non-negative.
        let mut w = r.uniform(len, 1e-4, 0.02);
        if matches!(what, Elem::ConvertCopy) {
            // Not rounded to bf16 (unlike every `Draw`): the converting copy rounds them.
            let s = r.next();
            w = (0..len).map(|i| rng::normal(s, i as u64)).collect();
            for (k, bits) in ROUNDING_EDGES.iter().enumerate() {
                w[PAD_LO + k] = f32::from_bits(*bits);
            }
        }
        ElemCase { what, n, x, y, z, w }
    }
    fn mid(&self) -> std::ops::Range<usize> {
        PAD_LO..PAD_LO + self.n
    }

    /// AdamW (params x, grads z, moments y and w) and the sum of squares: fp32 buffers.
    fn run_fp32<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mid = self.mid();
        let mut x = d.upload(&self.x)?;
        if let Elem::AdamW(h) = self.what {
            let (g, mut m, mut v) = (d.upload(&self.z)?, d.upload(&self.y)?, d.upload(&self.w)?);
            let (params, grads) = (d.view_mut(&mut x, mid.clone()), d.view(&g, mid.clone()));
            d.adamw(h, params, grads, d.view_mut(&mut m, mid.clone()), d.view_mut(&mut v, mid))?;
            return Ok(vec![("params", get(d, &x)?), ("m", get(d, &m)?), ("v", get(d, &v)?)]);
        }
        let s = d.sum_squares(d.view(&x, mid))?;
        Ok(vec![("sum", vec![s as f32])])
    }

    /// Unrounded fp32 `w` into an activation buffer and back into fp32 `y`, both through views:
    /// the round trip, and how many of its elements differ in any bit from `w` rounded to the
    /// activation dtype (`kernels::round_bf16` for bf16; unchanged for fp32).
    fn run_convert<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mid = self.mid();
        let src = d.upload(&self.w)?;
        let mut stored = d.activations(self.w.len())?;
        d.copy(d.view(&src, mid.clone()), d.view_mut(&mut stored, mid.clone()))?;
        let mut back = d.upload(&self.y)?;
        d.copy(d.view(&stored, mid.clone()), d.view_mut(&mut back, mid.clone()))?;
        let got = get(d, &back)?;
        let bf16 = d.activation_dtype() == Dtype::Bf16;
        let want = |v: f32| if bf16 { kernels::round_bf16(v) } else { v };
        let mismatches =
            got[mid.clone()].iter().zip(&self.w[mid]).filter(|(g, w)| g.to_bits() != want(**w).to_bits()).count();
        Ok(vec![("x", got), ("mismatches", vec![mismatches as f32])])
    }
}

impl Case for ElemCase {
    fn family(&self) -> &'static str {
        match self.what {
            Elem::DropoutForward { .. } | Elem::DropoutBackward { .. } => "DropoutOps",
            Elem::Add | Elem::AddAssign | Elem::Scale(_) => "ResidualOps",
            Elem::AdamW(_) | Elem::SumSquares => "OptimizerOps",
            Elem::Fill(_) | Elem::Copy | Elem::ConvertCopy | Elem::ViewMut2 => "Memory",
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
            Elem::ConvertCopy => "copy_converting",
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
            // Its "x" is the round trip (within the storage floor of the unrounded oracle);
            // its "mismatches" checks the rounding bit for bit.
            Elem::ConvertCopy => 0.0,
            _ => 1e-6,
        }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mid = self.mid();
        match self.what {
            Elem::AdamW(_) | Elem::SumSquares => return self.run_fp32(d),
            Elem::ConvertCopy => return self.run_convert(d),
            _ => {}
        }
        // Activations (and activation gradients) at the device's activation dtype.
        let mut x = act(d, &self.x)?;
        let y = act(d, &self.y)?;
        match self.what {
            Elem::DropoutForward { p, seed } => d.dropout_forward(d.view_mut(&mut x, mid), p, seed)?,
            Elem::DropoutBackward { p, seed } => d.dropout_backward(d.view_mut(&mut x, mid), p, seed)?,
            Elem::Add => {
                let z = act(d, &self.z)?;
                d.add(d.view(&y, mid.clone()), d.view(&z, mid.clone()), d.view_mut(&mut x, mid))?;
            }
            Elem::AddAssign => d.add_assign(d.view_mut(&mut x, mid.clone()), d.view(&y, mid))?,
            Elem::Scale(s) => d.scale(d.view_mut(&mut x, mid), s)?,
            Elem::AdamW(_) | Elem::SumSquares | Elem::ConvertCopy => unreachable!("run above"),
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
    fn reference(&self) -> Outputs {
        let mid = self.mid();
        let (mut x, mut y) = (self.x.clone(), self.y.clone());
        match self.what {
            Elem::DropoutForward { p, seed } | Elem::DropoutBackward { p, seed } => {
                reference::dropout(&mut x[mid], p, seed)
            }
            Elem::Add => reference::add(&self.y[mid.clone()], &self.z[mid.clone()], &mut x[mid]),
            Elem::AddAssign => reference::add_assign(&mut x[mid.clone()], &self.y[mid]),
            Elem::Scale(s) => reference::scale(&mut x[mid], s),
            Elem::AdamW(h) => {
                let mut v = self.w.clone();
                let g = &self.z[mid.clone()];
                reference::adamw(h, &mut x[mid.clone()], g, &mut y[mid.clone()], &mut v[mid]);
                return vec![("params", x), ("m", y), ("v", v)];
            }
            Elem::SumSquares => return vec![("sum", vec![reference::sum_squares(&x[mid]) as f32])],
            Elem::Fill(v) => x[mid].fill(v),
            Elem::Copy => x[mid.clone()].copy_from_slice(&self.y[mid]),
            Elem::ConvertCopy => {
                let mut y = self.y.clone();
                y[mid.clone()].copy_from_slice(&self.w[mid]);
                return vec![("x", y), ("mismatches", vec![0.0])];
            }
            Elem::ViewMut2 => {
                // The upper half copied onto the lower half, then filled.
                let h = self.n / 2;
                x.copy_within(PAD_LO + h..PAD_LO + 2 * h, PAD_LO);
                x[PAD_LO + h..PAD_LO + 2 * h].fill(-2.5);
                return vec![("x", x), ("zeros", vec![0.0; 7])];
            }
        }
        vec![("x", x)]
    }
}

/// Gradient clipping as training does it (`kernels::clip_grad_norm`: the global norm from
/// `sum_squares`, read back to the host, then `scale` when it is above the maximum): the norm
/// it returns and the gradients it leaves. The buffer is the whole gradient, as in training.
pub(crate) struct ClipCase {
    /// `max_norm` below the inputs' norm (the gradients are scaled) or above it (left alone).
    above: bool,
    max_norm: f32,
    grads: Vec<f32>,
}

impl ClipCase {
    pub(crate) fn new(r: &mut Draw, n: usize, above: bool) -> Self {
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
    fn reference(&self) -> Outputs {
        let mut grads = self.grads.clone();
        let norm = reference::clip_grad_norm(&mut grads, self.max_norm);
        vec![("norm", vec![norm as f32]), ("grads", grads)]
    }
}

/// `adamw_flat` on a flat buffer of odd length split into odd ranges: decaying, non-decaying
/// and skipped (frozen) ones, with a gradient norm above the maximum (clipped) or below it.
/// The reference is `reference::clip_grad_norm` on the whole gradient, then
/// `reference::adamw` range by range, with or without weight decay.
pub(crate) struct AdamWFlatCase {
    clipped: bool,
    max_norm: f32,
    h: AdamW,
    /// `(range, decay)`; the gaps between ranges are left alone.
    segments: Vec<(std::ops::Range<usize>, bool)>,
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// A stale GEMM copy of the parameters for `adamw_flat` to refresh (activation dtype): the
    /// updated elements must come out as the new parameters, rounded; the rest untouched.
    copy0: Option<Vec<f32>>,
}

impl AdamWFlatCase {
    /// The same update, also writing the weight copy.
    pub(crate) fn with_copy(self, r: &mut Draw) -> Self {
        let copy0 = Some(r.normal(self.p.len(), 1.0));
        Self { copy0, ..self }
    }

    pub(crate) fn new(r: &mut Draw, n: usize, clipped: bool) -> Self {
        let (p, g, m) = (r.normal(n, 1.0), r.normal(n, 0.1), r.normal(n, 0.01));
        let v = r.uniform(n, 1e-4, 0.02);
        let norm = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
        let max_norm = if clipped { 0.5 * norm } else { 2.0 * norm };
        // Odd range lengths (some longer than a chunk), cycling decay / no decay / skipped.
        let lens = [1, 3, 16385, 777, 40_001, 5, 131_071, 9, 32_769, 11];
        let (mut segments, mut at, mut k) = (Vec::new(), 0usize, 0usize);
        while at < n {
            let len = lens[k % lens.len()].min(n - at);
            match k % 3 {
                0 => segments.push((at..at + len, true)),
                1 => segments.push((at..at + len, false)),
                _ => {}
            }
            at += len;
            k += 1;
        }
        let h = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 3 };
        AdamWFlatCase { clipped, max_norm, h, segments, p, g, m, v, copy0: None }
    }
}

impl Case for AdamWFlatCase {
    fn family(&self) -> &'static str {
        "OptimizerOps"
    }
    fn op(&self) -> &'static str {
        match (self.copy0.is_some(), self.clipped) {
            (true, _) => "adamw_flat_copy",
            (false, true) => "adamw_flat_clipped",
            (false, false) => "adamw_flat_unclipped",
        }
    }
    fn shape(&self) -> String {
        format!("{} in {} ranges max {:.1}", self.p.len(), self.segments.len(), self.max_norm)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let n = self.p.len();
        let segs = FlatSegments::new(d, n, &self.segments)?;
        let (mut p, g, mut m, mut v) = (d.upload(&self.p)?, d.upload(&self.g)?, d.upload(&self.m)?, d.upload(&self.v)?);
        let mut norm = d.zeros(1)?;
        let mut copy = self.copy0.as_ref().map(|c| act(d, c)).transpose()?;
        d.adamw_flat(
            self.h,
            self.max_norm,
            &segs,
            d.view_mut(&mut p, 0..n),
            d.view(&g, 0..n),
            d.view_mut(&mut m, 0..n),
            d.view_mut(&mut v, 0..n),
            d.view_mut(&mut norm, 0..1),
            copy.as_mut().map(|c| d.view_mut(c, 0..n)),
        )?;
        let mut out = vec![
            ("norm", get(d, &norm)?),
            ("params", get(d, &p)?),
            ("m", get(d, &m)?),
            ("v", get(d, &v)?),
            ("grads", get(d, &g)?),
        ];
        if let Some(c) = &copy {
            out.push(("copy", get(d, c)?));
        }
        Ok(out)
    }
    fn reference(&self) -> Outputs {
        let (mut p, mut g, mut m, mut v) = (self.p.clone(), self.g.clone(), self.m.clone(), self.v.clone());
        let norm = reference::clip_grad_norm(&mut g, self.max_norm);
        for (r, decay) in &self.segments {
            let h = AdamW { weight_decay: if *decay { self.h.weight_decay } else { 0.0 }, ..self.h };
            reference::adamw(h, &mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r.clone()]);
        }
        let mut copy = self.copy0.clone();
        if let Some(c) = copy.as_mut() {
            for (r, _) in &self.segments {
                c[r.clone()].copy_from_slice(&p[r.clone()]);
            }
        }
        let mut out = vec![("norm", vec![norm as f32]), ("params", p), ("m", m), ("v", v), ("grads", self.g.clone())];
        out.extend(copy.map(|c| ("copy", c)));
        out
    }
}
