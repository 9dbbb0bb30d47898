//! EmbeddingOps, LayerNormOps and GeluOps: embedding lookup (assigned and accumulated) and its
//! scatter-add gradient, LayerNorm forward and backward (the backward from the oracle's saved
//! statistics, dx assigned or accumulated, dgamma and dbeta as two views of one buffer), and
//! the fused bias + GELU forward and backward.

use kernels::{Backend, Cpu};

use super::{Case, Draw, Outputs, all, all_mut, get};

pub(super) struct EmbeddingCase {
    pub(super) backward: bool,
    pub(super) accumulate: bool,
    pub(super) rows: usize,
    pub(super) dim: usize,
    pub(super) ids: Vec<i32>,
    pub(super) table: Vec<f32>,
    /// forward: the initial `out`; backward: `dout`.
    pub(super) x: Vec<f32>,
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
        format!("{} ids into {}x{} ({mode})", self.ids.len(), self.rows, self.dim)
    }
    fn tol(&self) -> f64 {
        if self.backward { 1e-5 } else { 1e-6 }
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let ids = d.upload_ids(&self.ids)?;
        let mut table = d.upload(&self.table)?;
        let mut x = d.upload(&self.x)?;
        if self.backward {
            d.embedding_backward(&ids, all(d, &x), self.dim, all_mut(d, &mut table))?;
            Ok(vec![("dtable", get(d, &table)?)])
        } else {
            d.embedding_forward(&ids, all(d, &table), self.dim, all_mut(d, &mut x), self.accumulate)?;
            Ok(vec![("out", get(d, &x)?)])
        }
    }
}
// LayerNormOps

pub(super) struct LayerNormCase {
    backward: bool,
    accumulate_dx: bool,
    rows: usize,
    c: usize,
    eps: f32,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    dout: Vec<f32>,
    /// Saved statistics for backward, from the oracle's forward (backward is tested alone).
    mean: Vec<f32>,
    rstd: Vec<f32>,
    garbage: Vec<f32>,
    dx0: Vec<f32>,
    dgamma0: Vec<f32>,
    dbeta0: Vec<f32>,
}

impl LayerNormCase {
    pub(super) fn new(r: &mut Draw, rows: usize, c: usize, backward: bool, accumulate_dx: bool) -> Self {
        let x = r.shifted(rows * c, 3.0, 2.0);
        let gamma = r.shifted(c, 1.0, 0.3);
        let beta = r.normal(c, 0.3);
        let (mut mean, mut rstd, mut out) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * c]);
        let eps = 1e-12;
        kernels::LayerNormOps::layernorm_forward(&Cpu, &x, &gamma, &beta, eps, &mut out, &mut mean, &mut rstd)
            .expect("oracle layernorm");
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
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let x = d.upload(&self.x)?;
        let gamma = d.upload(&self.gamma)?;
        if !self.backward {
            let beta = d.upload(&self.beta)?;
            let mut out = d.upload(&self.garbage)?;
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
        let dout = d.upload(&self.dout)?;
        let mean = d.upload(&self.mean)?;
        let rstd = d.upload(&self.rstd)?;
        let mut dx = d.upload(if self.accumulate_dx { &self.dx0 } else { &self.garbage })?;
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
}
// GeluOps

pub(super) struct GeluCase {
    pub(super) backward: bool,
    pub(super) rows: usize,
    pub(super) c: usize,
    pub(super) pre: Vec<f32>,
    pub(super) bias: Vec<f32>,
    pub(super) dout: Vec<f32>,
    pub(super) garbage: Vec<f32>,
    pub(super) dbias0: Vec<f32>,
}

impl Case for GeluCase {
    fn family(&self) -> &'static str {
        "GeluOps"
    }
    fn op(&self) -> &'static str {
        if self.backward { "bias_gelu_backward" } else { "bias_gelu_forward" }
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.rows, self.c)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let mut pre = d.upload(&self.pre)?;
        if !self.backward {
            let bias = d.upload(&self.bias)?;
            let mut out = d.upload(&self.garbage)?;
            d.bias_gelu_forward(all_mut(d, &mut pre), all(d, &bias), all_mut(d, &mut out))?;
            return Ok(vec![("pre", get(d, &pre)?), ("out", get(d, &out)?)]);
        }
        let dout = d.upload(&self.dout)?;
        let mut dpre = d.upload(&self.garbage)?;
        let mut dbias = d.upload(&self.dbias0)?;
        d.bias_gelu_backward(all(d, &pre), all(d, &dout), all_mut(d, &mut dpre), all_mut(d, &mut dbias))?;
        Ok(vec![("dpre", get(d, &dpre)?), ("dbias", get(d, &dbias)?)])
    }
}
