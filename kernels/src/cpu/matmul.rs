//! GEMM family on the CPU.
//!
//! `C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b]`, all row-major with explicit row strides,
//! through the `gemm` crate (AVX2/AVX-512 micro-kernels). `add_bias` broadcasts a bias over rows;
//! `bias_grad` is its backward (`dbias += column sums`, a parameter gradient).

use gemm::Parallelism;
use rayon::prelude::*;

use super::{Cpu, ROW_CHUNK, check};
use crate::{GemmOps, GemmShape, Operand, Result};

/// A strided matrix view: element (i, j) lives at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided {
    pub fn row_major(rows: usize, cols: usize, ld: usize) -> Self {
        Strided { rows, cols, rs: ld, cs: 1 }
    }
    pub fn t(self) -> Self {
        Strided { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 { 0 } else { (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1 }
    }
}

/// `dst = beta_dst * dst + alpha * a @ b` over strided views, bounds-checked.
/// `beta_dst == 0` overwrites `dst` without reading it (so stale NaNs never leak in).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    d: Strided,
    beta_dst: f32,
    alpha: f32,
    a: &[f32],
    sa: Strided,
    b: &[f32],
    sb: Strided,
    parallel: bool,
) {
    assert!(sa.rows == d.rows && sb.cols == d.cols && sa.cols == sb.rows, "matmul: shape mismatch");
    assert!(d.span() <= dst.len() && sa.span() <= a.len() && sb.span() <= b.len(), "matmul: out of bounds");
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    if sa.cols == 0 {
        for i in 0..d.rows {
            for j in 0..d.cols {
                dst[i * d.rs + j * d.cs] *= beta_dst;
            }
        }
        return;
    }
    let par = if parallel { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: the three views were bounds-checked above against their slices, `dst` is a unique borrow.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            sa.cols,
            dst.as_mut_ptr(),
            d.cs as isize,
            d.rs as isize,
            beta_dst != 0.0,
            a.as_ptr(),
            sa.cs as isize,
            sa.rs as isize,
            b.as_ptr(),
            sb.cs as isize,
            sb.rs as isize,
            beta_dst,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

fn operand_view(op: Operand, rows: usize, cols: usize) -> Strided {
    // `rows x cols` is the shape of op(X); the stored matrix is its transpose when `trans`.
    if op.trans { Strided::row_major(cols, rows, op.ld).t() } else { Strided::row_major(rows, cols, op.ld) }
}

impl GemmOps for Cpu {
    fn gemm(
        &self,
        s: GemmShape,
        alpha: f32,
        a: &[f32],
        op_a: Operand,
        b: &[f32],
        op_b: Operand,
        beta: f32,
        c: &mut [f32],
    ) -> Result<()> {
        let va = operand_view(op_a, s.m, s.k);
        let vb = operand_view(op_b, s.k, s.n);
        let vc = Strided::row_major(s.m, s.n, s.ldc);
        let need = |span: usize, stride: usize| {
            if s.batch == 0 { 0 } else { (s.batch - 1) * stride + span }
        };
        check("gemm", need(va.span(), op_a.batch_stride) <= a.len(), || {
            format!("A too short: {s:?} {op_a:?} len {}", a.len())
        })?;
        check("gemm", need(vb.span(), op_b.batch_stride) <= b.len(), || {
            format!("B too short: {s:?} {op_b:?} len {}", b.len())
        })?;
        check("gemm", need(vc.span(), s.batch_stride_c) <= c.len(), || format!("C too short: {s:?} len {}", c.len()))?;
        if s.batch == 1 {
            matmul(c, vc, beta, alpha, a, va, b, vb, true);
            return Ok(());
        }
        check("gemm", s.batch_stride_c >= vc.span() || s.batch_stride_c == 0 && s.batch <= 1, || {
            format!("batched C items overlap: {s:?}")
        })?;
        let items: Vec<(usize, &mut [f32])> = split_batches(c, s.batch, s.batch_stride_c, vc.span());
        items.into_par_iter().for_each(|(i, ci)| {
            let ai = &a[i * op_a.batch_stride..];
            let bi = &b[i * op_b.batch_stride..];
            matmul(ci, vc, beta, alpha, ai, va, bi, vb, false);
        });
        Ok(())
    }

    fn add_bias(&self, y: &mut [f32], bias: &[f32], cols: usize) -> Result<()> {
        check("add_bias", cols == bias.len() && cols > 0 && y.len().is_multiple_of(cols), || {
            format!("y len {} not a multiple of bias len {}", y.len(), bias.len())
        })?;
        y.par_chunks_mut(cols * ROW_CHUNK).for_each(|rows| {
            for row in rows.chunks_mut(cols) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        });
        Ok(())
    }

    fn bias_grad(&self, dy: &[f32], dbias: &mut [f32], cols: usize) -> Result<()> {
        check("bias_grad", cols == dbias.len() && cols > 0 && dy.len().is_multiple_of(cols), || {
            format!("dy len {} not a multiple of dbias len {}", dy.len(), dbias.len())
        })?;
        let sum = column_sums(dy, cols);
        for (d, s) in dbias.iter_mut().zip(sum) {
            *d += s;
        }
        Ok(())
    }
}

/// Column sums of a row-major `[rows, cols]` matrix: per-chunk partials, then a reduction.
pub(crate) fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    // Per-chunk partials collected in order, then added in order: deterministic bits whatever
    // the thread schedule (bitwise-exact resume depends on it).
    let partials: Vec<Vec<f32>> = x
        .par_chunks(cols * 64)
        .map(|rows| {
            let mut acc = vec![0.0f32; cols];
            for row in rows.chunks(cols) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f32; cols];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Split `c` into `batch` disjoint mutable windows of `span` elements spaced `stride` apart.
fn split_batches(c: &mut [f32], batch: usize, stride: usize, span: usize) -> Vec<(usize, &mut [f32])> {
    let mut out = Vec::with_capacity(batch);
    let mut rest = c;
    for i in 0..batch {
        let take = if i + 1 == batch { span } else { stride };
        let (head, tail) = rest.split_at_mut(take);
        out.push((i, &mut head[..span]));
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    /// The f64 reference of `kernels::reference`, on a copy of C.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        s: GemmShape,
        alpha: f32,
        a: &[f32],
        oa: Operand,
        b: &[f32],
        ob: Operand,
        beta: f32,
        c: &[f32],
    ) -> Vec<f32> {
        let mut out = c.to_vec();
        crate::reference::gemm(s, alpha, a, oa, b, ob, beta, &mut out);
        out
    }

    #[test]
    fn gemm_all_transposes_match_naive() {
        let (m, n, k) = (37, 29, 53);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = randn(m * k, 1.0, 1);
            let b = randn(k * n, 1.0, 2);
            let c0 = randn(m * n, 1.0, 3);
            let oa = if ta { Operand::t(m) } else { Operand::n(k) };
            let ob = if tb { Operand::t(k) } else { Operand::n(n) };
            let s = GemmShape::plain(m, n, k);
            let want = naive(s, 0.7, &a, oa, &b, ob, 0.3, &c0);
            let mut c = c0.clone();
            Cpu.gemm(s, 0.7, &a, oa, &b, ob, 0.3, &mut c).unwrap();
            assert_close(&format!("gemm ta={ta} tb={tb}"), &c, &want, 1e-5);
        }
    }

    #[test]
    fn gemm_batched_strided_with_leading_dims() {
        // Per-head products inside an interleaved [batch, t, heads*d] layout.
        let (batch, m, n, k, ld) = (3, 11, 13, 7, 19);
        let a = randn(batch * m * ld + 5, 1.0, 4);
        let b = randn(batch * n * ld + 5, 1.0, 5);
        let s = GemmShape { m, n, k, batch, ldc: n + 2, batch_stride_c: m * (n + 2) };
        let oa = Operand { trans: false, ld, batch_stride: m * ld };
        let ob = Operand { trans: true, ld, batch_stride: n * ld };
        let c0 = randn(batch * m * (n + 2), 1.0, 6);
        let want = naive(s, 1.3, &a, oa, &b, ob, 0.0, &c0);
        let mut c = c0.clone();
        Cpu.gemm(s, 1.3, &a, oa, &b, ob, 0.0, &mut c).unwrap();
        // Padding columns (j >= n) keep their old values.
        assert_close("batched gemm", &c, &want, 1e-5);
    }

    #[test]
    fn gemm_rejects_short_buffers() {
        let s = GemmShape::plain(4, 4, 4);
        let mut c = vec![0.0; 15];
        assert!(Cpu.gemm(s, 1.0, &[1.0; 16], Operand::n(4), &[1.0; 16], Operand::n(4), 0.0, &mut c).is_err());
    }

    #[test]
    fn bias_add_and_grad() {
        let (rows, cols) = (33, 17);
        let bias = randn(cols, 1.0, 7);
        let y0 = randn(rows * cols, 1.0, 8);
        let mut y = y0.clone();
        Cpu.add_bias(&mut y, &bias, cols).unwrap();
        let want: Vec<f32> = y0.iter().enumerate().map(|(i, v)| v + bias[i % cols]).collect();
        assert_close("add_bias", &y, &want, 1e-6);
        let d0 = randn(cols, 1.0, 9);
        let mut db = d0.clone();
        Cpu.bias_grad(&y0, &mut db, cols).unwrap();
        let want: Vec<f32> = (0..cols).map(|j| d0[j] + (0..rows).map(|r| y0[r * cols + j]).sum::<f32>()).collect();
        assert_close("bias_grad accumulates", &db, &want, 1e-5);
    }
}
