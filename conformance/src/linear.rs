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
