//! GemmOps: the four transpose combinations of a plain GEMM with a non-zero C, a small product
//! reading A from a view, batched strided products laid out as attention uses them, and the
//! bias add and bias gradient.

use kernels::{Backend, GemmShape, Operand, reference};

use super::{Case, Draw, Outputs, act, all, all_mut, get};

/// Elements a GEMM operand spans: `rows x cols` as read, stored with row stride `ld`.
fn operand_span(op: Operand, rows: usize, cols: usize, batch: usize) -> usize {
    let (sr, sc) = if op.trans { (cols, rows) } else { (rows, cols) };
    (batch - 1) * op.batch_stride + (sr - 1) * op.ld + sc
}

pub(crate) struct GemmCase {
    label: &'static str,
    tol: f64,
    s: GemmShape,
    alpha: f32,
    beta: f32,
    op_a: Operand,
    op_b: Operand,
    /// A is read from this offset of its buffer (a view, as the model reads parameters).
    a_off: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    c0: Vec<f32>,
    /// C is an fp32 parameter gradient (`zeros`/`upload`) rather than an activation: on a
    /// device with bf16 activations, bf16 A and B accumulate into fp32.
    c_param: bool,
}

impl GemmCase {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        r: &mut Draw,
        label: &'static str,
        tol: f64,
        s: GemmShape,
        op_a: Operand,
        op_b: Operand,
        a_off: usize,
        alpha: f32,
        beta: f32,
    ) -> Self {
        let a_len = a_off + operand_span(op_a, s.m, s.k, s.batch) + 3;
        let b_len = operand_span(op_b, s.k, s.n, s.batch);
        let c_len = (s.batch - 1) * s.batch_stride_c + (s.m - 1) * s.ldc + s.n + 2;
        GemmCase {
            label,
            tol,
            s,
            alpha,
            beta,
            op_a,
            op_b,
            a_off,
            a: r.normal(a_len, 1.0),
            b: r.normal(b_len, 1.0),
            c0: r.normal(c_len, 1.0),
            c_param: false,
        }
    }

    /// The same product into an fp32 parameter-gradient C.
    pub(crate) fn into_param_grad(self) -> Self {
        GemmCase { label: "gemm_param_grad", c_param: true, ..self }
    }
}

impl Case for GemmCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        self.label
    }
    fn shape(&self) -> String {
        let t = |o: Operand| if o.trans { 'T' } else { 'N' };
        let s = &self.s;
        let batch = if s.batch > 1 { format!("{}x ", s.batch) } else { String::new() };
        format!("{batch}{}x{}x{} {}{} a={} b={}", s.m, s.n, s.k, t(self.op_a), t(self.op_b), self.alpha, self.beta)
    }
    fn tol(&self) -> f64 {
        self.tol
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let a = act(d, &self.a)?;
        let b = act(d, &self.b)?;
        let mut c = if self.c_param { d.upload(&self.c0)? } else { act(d, &self.c0)? };
        let av = d.view(&a, self.a_off..self.a.len());
        d.gemm(self.s, self.alpha, av, self.op_a, all(d, &b), self.op_b, self.beta, all_mut(d, &mut c))?;
        Ok(vec![("c", get(d, &c)?)])
    }
    fn reference(&self) -> Outputs {
        let mut c = self.c0.clone();
        let a = &self.a[self.a_off..];
        reference::gemm(self.s, self.alpha, a, self.op_a, &self.b, self.op_b, self.beta, &mut c);
        vec![("c", c)]
    }
}

pub(crate) struct AddBiasCase {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) y: Vec<f32>,
    pub(crate) bias: Vec<f32>,
}

impl Case for AddBiasCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        "add_bias"
    }
    fn shape(&self) -> String {
        format!("{}x{}", self.rows, self.cols)
    }
    fn tol(&self) -> f64 {
        1e-6
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        // y is an activation, the bias a parameter (fp32).
        let mut y = act(d, &self.y)?;
        let bias = d.upload(&self.bias)?;
        d.add_bias(all_mut(d, &mut y), all(d, &bias), self.cols)?;
        Ok(vec![("y", get(d, &y)?)])
    }
    fn reference(&self) -> Outputs {
        let mut y = self.y.clone();
        reference::add_bias(&mut y, &self.bias, self.cols);
        vec![("y", y)]
    }
}

pub(crate) struct BiasGradCase {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) dy: Vec<f32>,
    pub(crate) dbias0: Vec<f32>,
}

impl Case for BiasGradCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        "bias_grad"
    }
    fn shape(&self) -> String {
        format!("{}x{} (+=)", self.rows, self.cols)
    }
    fn tol(&self) -> f64 {
        1e-5
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        // dy is an activation gradient; dbias a parameter gradient (fp32).
        let dy = act(d, &self.dy)?;
        let mut db = d.upload(&self.dbias0)?;
        d.bias_grad(all(d, &dy), all_mut(d, &mut db), self.cols)?;
        Ok(vec![("dbias", get(d, &db)?)])
    }
    fn reference(&self) -> Outputs {
        let mut db = self.dbias0.clone();
        reference::bias_grad(&self.dy, &mut db, self.cols);
        vec![("dbias", db)]
    }
}

/// A linear layer through the fused-epilogue GEMMs: forward `y = x W^T + bias`
/// (`gemm_bias`), or backward `dW = dy^T x`, `dbias = colsum(dy)`, both assigned over whatever
/// the buffers held (`gemm_bias_grad`). x and dy are activations; W, the bias and both
/// gradients fp32 parameters. The bias and gradients are read at an odd offset, as the model's
/// views are (cuBLASLt may then fall back to the unfused pair: the results must not change).
pub(crate) struct LinearEpilogueCase {
    pub(crate) backward: bool,
    pub(crate) rows: usize,
    pub(crate) in_dim: usize,
    pub(crate) out_dim: usize,
    /// x `[rows, in]`, W `[out, in]`, bias `[out]`, dy `[rows, out]`, stale dW and dbias.
    pub(crate) x: Vec<f32>,
    pub(crate) w: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) dy: Vec<f32>,
    pub(crate) stale: Vec<f32>,
    pub(crate) tol: f64,
}

const OFFSET: usize = 3;

impl Case for LinearEpilogueCase {
    fn family(&self) -> &'static str {
        "GemmOps"
    }
    fn op(&self) -> &'static str {
        if self.backward { "gemm_bias_grad" } else { "gemm_bias" }
    }
    fn shape(&self) -> String {
        format!("rows {} in {} out {}", self.rows, self.in_dim, self.out_dim)
    }
    fn tol(&self) -> f64 {
        self.tol
    }
    fn run<D: Backend>(&self, d: &D) -> kernels::Result<Outputs> {
        let (r, i, o) = (self.rows, self.in_dim, self.out_dim);
        let x = act(d, &self.x)?;
        if !self.backward {
            let (w, bias) = (act(d, &self.w)?, d.upload(&self.bias)?);
            let mut y = act(d, &self.dy)?;
            let s = GemmShape::plain(r, o, i);
            let bias = d.view(&bias, OFFSET..OFFSET + o);
            d.gemm_bias(s, all(d, &x), Operand::n(i), all(d, &w), Operand::t(i), bias, all_mut(d, &mut y))?;
            return Ok(vec![("y", get(d, &y)?)]);
        }
        let dy = act(d, &self.dy)?;
        let mut grads = d.upload(&self.stale)?;
        let (dw, db) = d.view_mut2(&mut grads, OFFSET + o..OFFSET + o + o * i, OFFSET..OFFSET + o);
        d.gemm_bias_grad(GemmShape::plain(o, i, r), all(d, &dy), Operand::t(o), all(d, &x), Operand::n(i), dw, db)?;
        let g = get(d, &grads)?;
        Ok(vec![("dbias", g[OFFSET..OFFSET + o].to_vec()), ("dW", g[OFFSET + o..OFFSET + o + o * i].to_vec())])
    }
    fn reference(&self) -> Outputs {
        let (r, i, o) = (self.rows, self.in_dim, self.out_dim);
        if !self.backward {
            let mut y = vec![0.0; r * o];
            reference::gemm(
                GemmShape::plain(r, o, i),
                1.0,
                &self.x,
                Operand::n(i),
                &self.w,
                Operand::t(i),
                0.0,
                &mut y,
            );
            reference::add_bias(&mut y, &self.bias[OFFSET..OFFSET + o], o);
            return vec![("y", y)];
        }
        let mut dw = vec![0.0; o * i];
        reference::gemm(GemmShape::plain(o, i, r), 1.0, &self.dy, Operand::t(o), &self.x, Operand::n(i), 0.0, &mut dw);
        let mut db = vec![0.0; o];
        reference::bias_grad(&self.dy, &mut db, o);
        vec![("dbias", db), ("dW", dw)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operand_span_covers_strided_batches() {
        // 3 heads of a [37, 21] matrix, each 37x7, batch stride 7.
        let op = Operand { trans: false, ld: 21, batch_stride: 7 };
        assert_eq!(operand_span(op, 37, 7, 3), 2 * 7 + 36 * 21 + 7);
        // Read transposed: a 7x37 operand stored as 37 rows of 7.
        assert_eq!(operand_span(Operand::t(7), 7, 37, 1), 36 * 7 + 7);
    }
}
