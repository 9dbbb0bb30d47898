//! EmbeddingOps, LayerNormOps, ResidualNormOps and GeluOps: embedding lookup (assigned and
//! accumulated) and its scatter-add gradient, LayerNorm forward and backward (the backward from
//! the oracle's saved statistics, dx assigned or accumulated, dgamma and dbeta as two views of
//! one buffer), residual + dropout + LayerNorm forward and backward (the same, on views that may
//! be misaligned), and the fused bias + GELU forward and backward.

use kernels::{Backend, reference};

use super::{Case, Draw, Outputs, act, all, all_mut, get};

pub(crate) struct EmbeddingCase {
    pub(crate) backward: bool,
    pub(crate) accumulate: bool,
    pub(crate) rows: usize,
    pub(crate) dim: usize,
    pub(crate) ids: Vec<i32>,
    pub(crate) table: Vec<f32>,
    /// forward: the initial `out`; backward: `dout`.
    pub(crate) x: Vec<f32>,
    /// The table is an activation, not a parameter: the op gathers (forward) or scatters
    /// (backward) rows of it, as the LM head does with its label rows.
    pub(crate) rows_of_activations: bool,
}

impl Case for EmbeddingCase {
    fn family(&self) -> &'static str {
        "EmbeddingOps"
    }
    fn op(&self) -> &'static str {
        if self.backward { "embedding_backward" } else { "embedding_forward" }
    }
    fn shape(&self) -> String {
        let mode = if self.backward || self.accumulate { "+=" } else { "=" };
        let table = if self.rows_of_activations { ", activation rows" } else { "" };
        format!("{} ids into {}x{} ({mode}{table})", self.ids.len(), self.rows, self.dim)
    }
    fn tol(&self) -> f64 {
        if self.backward { 1e-5 } else { 1e-6 }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let ids = d.upload_ids(&self.ids)?;
        // The table (and its gradient) is an fp32 parameter, or activation rows; out and dout are
        // activations.
        let mut table = if self.rows_of_activations { act(d, &self.table)? } else { d.upload(&self.table)? };
        let mut x = act(d, &self.x)?;
        if self.backward {
            d.embedding_backward(&ids, all(d, &x), self.dim, all_mut(d, &mut table))?;
            Ok(vec![("dtable", get(d, &table)?)])
        } else {
            d.embedding_forward(&ids, all(d, &table), self.dim, all_mut(d, &mut x), self.accumulate)?;
            Ok(vec![("out", get(d, &x)?)])
        }
    }
    fn reference(&self) -> Outputs {
        if self.backward {
            let mut dtable = self.table.clone();
            reference::embedding_backward(&self.ids, &self.x, self.dim, &mut dtable);
            vec![("dtable", dtable)]
        } else {
            let mut out = self.x.clone();
            reference::embedding_forward(&self.ids, &self.table, self.dim, &mut out, self.accumulate);
            vec![("out", out)]
        }
    }
}
// LayerNormOps

pub(crate) struct LayerNormCase {
    backward: bool,
    accumulate_dx: bool,
    rows: usize,
    c: usize,
    eps: f32,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    dout: Vec<f32>,
    /// Saved statistics for backward, from the f64 reference's forward (backward is tested
    /// alone, from the same statistics on every side).
    mean: Vec<f32>,
    rstd: Vec<f32>,
    garbage: Vec<f32>,
    dx0: Vec<f32>,
    dgamma0: Vec<f32>,
    dbeta0: Vec<f32>,
}

impl LayerNormCase {
    pub(crate) fn new(r: &mut Draw, rows: usize, c: usize, backward: bool, accumulate_dx: bool) -> Self {
        let x = r.shifted(rows * c, 3.0, 2.0);
        let gamma = r.shifted(c, 1.0, 0.3);
        let beta = r.normal(c, 0.3);
        let (mut mean, mut rstd, mut out) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * c]);
        let eps = 1e-12;
        reference::layernorm_forward(&x, &gamma, &beta, eps, &mut out, &mut mean, &mut rstd);
        LayerNormCase {
            backward,
            accumulate_dx,
            rows,
            c,
            eps,
            x,
            gamma,
            beta,
            dout: r.normal(rows * c, 1.0),
            mean,
            rstd,
            garbage: r.normal(rows * c, 5.0),
            dx0: r.normal(rows * c, 1.0),
            dgamma0: r.normal(c, 1.0),
            dbeta0: r.normal(c, 1.0),
        }
    }
}

impl Case for LayerNormCase {
    fn family(&self) -> &'static str {
        "LayerNormOps"
    }
    fn op(&self) -> &'static str {
        match (self.backward, self.accumulate_dx) {
            (false, _) => "layernorm_forward",
            (true, false) => "layernorm_backward",
            (true, true) => "layernorm_backward+=",
        }
    }
    fn shape(&self) -> String {
        let dx = if !self.backward {
            ""
        } else if self.accumulate_dx {
            " (dx +=)"
        } else {
            " (dx =)"
        };
        format!("{}x{}{dx}", self.rows, self.c)
    }
    fn tol(&self) -> f64 {
        if self.backward { 1e-4 } else { 1e-5 }
    }
    /// x, out, dout and dx are activations (`act`: bf16 on a mixed-precision device); gamma,
    /// beta, the statistics and the parameter gradients fp32.
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let x = act(d, &self.x)?;
        let gamma = d.upload(&self.gamma)?;
        if !self.backward {
            let beta = d.upload(&self.beta)?;
            let mut out = act(d, &self.garbage)?;
            let mut mean = d.upload(&self.garbage[..self.rows])?;
            let mut rstd = d.upload(&self.garbage[self.rows..2 * self.rows])?;
            d.layernorm_forward(
                all(d, &x),
                all(d, &gamma),
                all(d, &beta),
                self.eps,
                all_mut(d, &mut out),
                all_mut(d, &mut mean),
                all_mut(d, &mut rstd),
            )?;
            return Ok(vec![("out", get(d, &out)?), ("mean", get(d, &mean)?), ("rstd", get(d, &rstd)?)]);
        }
        let dout = act(d, &self.dout)?;
        let mean = d.upload(&self.mean)?;
        let rstd = d.upload(&self.rstd)?;
        let mut dx = act(d, if self.accumulate_dx { &self.dx0 } else { &self.garbage })?;
        // dgamma and dbeta as two views of one buffer, as the model passes them.
        let c = self.c;
        let mut dgb = d.upload(&[self.dgamma0.as_slice(), &self.dbeta0].concat())?;
        {
            let (dg, db) = d.view_mut2(&mut dgb, 0..c, c..2 * c);
            d.layernorm_backward(
                all(d, &dout),
                all(d, &x),
                all(d, &gamma),
                all(d, &mean),
                all(d, &rstd),
                all_mut(d, &mut dx),
                self.accumulate_dx,
                dg,
                db,
            )?;
        }
        let dgb = get(d, &dgb)?;
        Ok(vec![("dx", get(d, &dx)?), ("dgamma", dgb[..c].to_vec()), ("dbeta", dgb[c..].to_vec())])
    }
    fn reference(&self) -> Outputs {
        let rows = self.rows;
        if !self.backward {
            let mut out = self.garbage.clone();
            let (mut mean, mut rstd) = (self.garbage[..rows].to_vec(), self.garbage[rows..2 * rows].to_vec());
            reference::layernorm_forward(&self.x, &self.gamma, &self.beta, self.eps, &mut out, &mut mean, &mut rstd);
            return vec![("out", out), ("mean", mean), ("rstd", rstd)];
        }
        let mut dx = if self.accumulate_dx { self.dx0.clone() } else { self.garbage.clone() };
        let (mut dgamma, mut dbeta) = (self.dgamma0.clone(), self.dbeta0.clone());
        let (x, gamma, dout) = (&self.x, &self.gamma, &self.dout);
        let acc = self.accumulate_dx;
        reference::layernorm_backward(dout, x, gamma, &self.mean, &self.rstd, &mut dx, acc, &mut dgamma, &mut dbeta);
        vec![("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta)]
    }
}
// GeluOps

pub(crate) struct GeluCase {
    pub(crate) backward: bool,
    /// The bias-free ops (`gelu_forward`, `gelu_backward`): the bias is the GEMM's.
    pub(crate) plain: bool,
    pub(crate) rows: usize,
    pub(crate) c: usize,
    pub(crate) pre: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) dout: Vec<f32>,
    pub(crate) garbage: Vec<f32>,
    pub(crate) dbias0: Vec<f32>,
}

impl Case for GeluCase {
    fn family(&self) -> &'static str {
        "GeluOps"
    }
    fn op(&self) -> &'static str {
        match (self.plain, self.backward) {
            (false, false) => "bias_gelu_forward",
            (false, true) => "bias_gelu_backward",
            (true, false) => "gelu_forward",
            (true, true) => "gelu_backward",
        }
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.rows, self.c)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        // pre, out, dout and dpre are activations; the bias and its gradient fp32.
        let mut pre = act(d, &self.pre)?;
        if self.plain {
            let mut out = act(d, &self.garbage)?;
            if self.backward {
                let dout = act(d, &self.dout)?;
                d.gelu_backward(all(d, &pre), all(d, &dout), all_mut(d, &mut out))?;
                return Ok(vec![("dpre", get(d, &out)?)]);
            }
            d.gelu_forward(all(d, &pre), all_mut(d, &mut out))?;
            return Ok(vec![("out", get(d, &out)?)]);
        }
        if !self.backward {
            let bias = d.upload(&self.bias)?;
            let mut out = act(d, &self.garbage)?;
            d.bias_gelu_forward(all_mut(d, &mut pre), all(d, &bias), all_mut(d, &mut out))?;
            return Ok(vec![("pre", get(d, &pre)?), ("out", get(d, &out)?)]);
        }
        let dout = act(d, &self.dout)?;
        let mut dpre = act(d, &self.garbage)?;
        let mut dbias = d.upload(&self.dbias0)?;
        d.bias_gelu_backward(all(d, &pre), all(d, &dout), all_mut(d, &mut dpre), all_mut(d, &mut dbias))?;
        Ok(vec![("dpre", get(d, &dpre)?), ("dbias", get(d, &dbias)?)])
    }
    fn reference(&self) -> Outputs {
        let mut pre = self.pre.clone();
        if self.plain {
            // The bias ops with a zero bias (pre + 0 is pre exactly).
            let (mut out, zero) = (self.garbage.clone(), vec![0.0; self.c]);
            if self.backward {
                reference::bias_gelu_backward(&pre, &self.dout, &mut out, &mut zero.clone());
                return vec![("dpre", out)];
            }
            reference::bias_gelu_forward(&mut pre, &zero, &mut out);
            return vec![("out", out)];
        }
        if !self.backward {
            let mut out = self.garbage.clone();
            reference::bias_gelu_forward(&mut pre, &self.bias, &mut out);
            return vec![("pre", pre), ("out", out)];
        }
        let (mut dpre, mut dbias) = (self.garbage.clone(), self.dbias0.clone());
        reference::bias_gelu_backward(&pre, &self.dout, &mut dpre, &mut dbias);
        vec![("dpre", dpre), ("dbias", dbias)]
    }
}
// ResidualNormOps

/// Residual + dropout + LayerNorm, fused. Every row tensor sits `offset` elements into a larger
/// buffer (an offset of 1 makes the pointers misaligned for 4-element vector access, in fp32
/// and in bf16, so a device must take its scalar path there); the backward starts from the f64
/// reference's statistics of a drawn sum, as the LayerNorm case does. The row tensors are
/// activations (`act`); gamma, beta, the statistics and the parameter gradients fp32.
pub(crate) struct ResidualNormCase {
    backward: bool,
    accumulate_skip: bool,
    offset: usize,
    rows: usize,
    c: usize,
    p: f32,
    seed: u64,
    x: Vec<f32>,
    skip: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    dout: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    garbage: Vec<f32>,
    d_skip0: Vec<f32>,
    dgamma0: Vec<f32>,
    dbeta0: Vec<f32>,
    /// The device stores activations in bf16 (the draws are rounded to it).
    bf16: bool,
}

/// `(backward, accumulate_skip)` of a residual-norm case.
pub(crate) type ResidualNormMode = (bool, bool);

impl ResidualNormCase {
    pub(crate) fn new(r: &mut Draw, rows: usize, c: usize, p: f32, offset: usize, mode: ResidualNormMode) -> Self {
        let n = rows * c;
        // Forward: x is the block output; backward: x is the saved sum (mean 3, as LayerNorm's).
        let x = if mode.0 { r.shifted(n, 3.0, 2.0) } else { r.normal(n, 1.5) };
        let skip = r.shifted(n, 3.0, 2.0);
        let gamma = r.shifted(c, 1.0, 0.3);
        let beta = r.normal(c, 0.3);
        let (mut mean, mut rstd, mut out) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; n]);
        reference::layernorm_forward(&x, &gamma, &beta, 1e-12, &mut out, &mut mean, &mut rstd);
        ResidualNormCase {
            backward: mode.0,
            accumulate_skip: mode.1,
            offset,
            rows,
            c,
            p,
            seed: r.next(),
            x,
            skip,
            gamma,
            beta,
            dout: r.normal(n, 1.0),
            mean,
            rstd,
            garbage: r.normal(n + offset, 5.0),
            d_skip0: r.normal(n, 1.0),
            dgamma0: r.normal(c, 1.0),
            dbeta0: r.normal(c, 1.0),
            bf16: r.bf16,
        }
    }

    /// `data` after `offset` elements of garbage (the host side of a view at `offset`).
    fn padded(&self, data: &[f32]) -> Vec<f32> {
        [&self.garbage[..self.offset], data].concat()
    }
}

impl Case for ResidualNormCase {
    fn family(&self) -> &'static str {
        "ResidualNormOps"
    }
    fn op(&self) -> &'static str {
        match (self.backward, self.accumulate_skip) {
            (false, _) => "residual_norm_forward",
            (true, false) => "residual_norm_backward",
            (true, true) => "residual_norm_backward+=",
        }
    }
    fn shape(&self) -> String {
        let skip = match (self.backward, self.accumulate_skip) {
            (false, _) => "",
            (true, false) => " (d_skip =)",
            (true, true) => " (d_skip +=)",
        };
        format!("{}x{} p {} offset {}{skip}", self.rows, self.c, self.p, self.offset)
    }
    fn tol(&self) -> f64 {
        match (self.backward, self.bf16) {
            (true, _) => 1e-4,
            (false, false) => 1e-5,
            // With bf16 storage the device normalises the sum as stored (rounded to bf16, up to
            // 2^-8 of |sum|: what backward reads back), the oracle its fp32 sum. That rounding
            // goes through (sum - mean) * rstd * gamma, and with these draws (sum of mean 3, std
            // about 2.5) the largest |sum| is about 1.3 times the largest |sum - mean|, so `out`
            // can be off by about 1.3 * 2^-8 of its largest value before its own rounding
            // (2^-8): a bound near 4.6 * 2^-9 = 9.0e-3, above the 4 * 2^-9 = 7.8e-3 floor.
            // Measured on the virtual GPU: up to 7.5e-3 in 18 seeds (37x384, p 0); mean and rstd
            // up to 1.2e-3 and 2.2e-3. Twice the floor leaves room for unluckier draws.
            (false, true) => 8.0 * 2f64.powi(-9),
        }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let (o, n, c) = (self.offset, self.rows * self.c, self.c);
        let rows = o..o + n;
        let gamma = d.upload(&self.padded(&self.gamma))?;
        let g = d.view(&gamma, o..o + c);
        let mut mean = d.upload(&self.padded(&self.mean))?;
        let mut rstd = d.upload(&self.padded(&self.rstd))?;
        let stat = o..o + self.rows;
        if !self.backward {
            let mut sum = act(d, &self.padded(&self.x))?;
            let skip = act(d, &self.padded(&self.skip))?;
            let beta = d.upload(&self.padded(&self.beta))?;
            let mut out = act(d, &self.garbage)?;
            d.residual_norm_forward(
                d.view_mut(&mut sum, rows.clone()),
                d.view(&skip, rows.clone()),
                g,
                d.view(&beta, o..o + c),
                1e-12,
                self.p,
                self.seed,
                d.view_mut(&mut out, rows.clone()),
                d.view_mut(&mut mean, stat.clone()),
                d.view_mut(&mut rstd, stat.clone()),
            )?;
            let get = |b: &D::Buf, r: std::ops::Range<usize>| d.download(d.view(b, r));
            return Ok(vec![
                ("sum", get(&sum, rows.clone())?),
                ("out", get(&out, rows)?),
                ("mean", get(&mean, stat.clone())?),
                ("rstd", get(&rstd, stat)?),
            ]);
        }
        let dout = act(d, &self.padded(&self.dout))?;
        let sum = act(d, &self.padded(&self.x))?;
        let mut d_skip = act(d, &self.padded(if self.accumulate_skip { &self.d_skip0 } else { &self.garbage[..n] }))?;
        let mut d_x = act(d, &self.garbage)?;
        let mut dgb = d.upload(&self.padded(&[self.dgamma0.as_slice(), &self.dbeta0].concat()))?;
        {
            let (dg, db) = d.view_mut2(&mut dgb, o..o + c, o + c..o + 2 * c);
            d.residual_norm_backward(
                d.view(&dout, rows.clone()),
                d.view(&sum, rows.clone()),
                g,
                d.view(&mean, stat.clone()),
                d.view(&rstd, stat),
                self.p,
                self.seed,
                d.view_mut(&mut d_skip, rows.clone()),
                self.accumulate_skip,
                d.view_mut(&mut d_x, rows.clone()),
                dg,
                db,
            )?;
        }
        let dgb = d.download(d.view(&dgb, o..o + 2 * c))?;
        Ok(vec![
            ("d_skip", d.download(d.view(&d_skip, rows.clone()))?),
            ("d_x", d.download(d.view(&d_x, rows))?),
            ("dgamma", dgb[..c].to_vec()),
            ("dbeta", dgb[c..].to_vec()),
        ])
    }
    fn reference(&self) -> Outputs {
        let n = self.rows * self.c;
        if !self.backward {
            let mut sum = self.x.clone();
            reference::dropout(&mut sum, self.p, self.seed);
            reference::add_assign(&mut sum, &self.skip);
            let (mut out, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; self.rows], vec![0.0; self.rows]);
            reference::layernorm_forward(&sum, &self.gamma, &self.beta, 1e-12, &mut out, &mut mean, &mut rstd);
            return vec![("sum", sum), ("out", out), ("mean", mean), ("rstd", rstd)];
        }
        let mut d_sum = vec![0.0; n];
        let (mut dgamma, mut dbeta) = (self.dgamma0.clone(), self.dbeta0.clone());
        let (x, gamma, dout) = (&self.x, &self.gamma, &self.dout);
        reference::layernorm_backward(
            dout,
            x,
            gamma,
            &self.mean,
            &self.rstd,
            &mut d_sum,
            false,
            &mut dgamma,
            &mut dbeta,
        );
        let mut d_skip = if self.accumulate_skip { self.d_skip0.clone() } else { vec![0.0; n] };
        reference::add_assign(&mut d_skip, &d_sum);
        reference::dropout(&mut d_sum, self.p, self.seed);
        vec![("d_skip", d_skip), ("d_x", d_sum), ("dgamma", dgamma), ("dbeta", dbeta)]
    }
}
