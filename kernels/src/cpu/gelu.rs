//! Bias + exact GELU on the CPU (BERT's "gelu", the erf form, not the tanh approximation).
//!
//! forward:  `pre += bias` (broadcast over rows; kept for backward), `out = pre * Phi(pre)`
//!           with `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
//! backward: `dpre = dout * (Phi(pre) + pre * phi(pre))` (assigned),
//!           `dbias += sum_rows(dpre)` (parameter gradient).

use rayon::prelude::*;

use super::matmul::column_sums;
use super::{Cpu, ROW_CHUNK, check};
use crate::{GeluOps, Result};

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

impl GeluOps for Cpu {
    fn bias_gelu_forward(&self, pre: &mut [f32], bias: &[f32], out: &mut [f32]) -> Result<()> {
        let c = bias.len();
        check("bias_gelu_forward", c > 0 && pre.len().is_multiple_of(c) && out.len() == pre.len(), || {
            format!("pre {} out {} bias {c}", pre.len(), out.len())
        })?;
        pre.par_chunks_mut(c * ROW_CHUNK).zip(out.par_chunks_mut(c * ROW_CHUNK)).for_each(|(p, o)| {
            for (prow, orow) in p.chunks_mut(c).zip(o.chunks_mut(c)) {
                for i in 0..c {
                    prow[i] += bias[i];
                    orow[i] = gelu(prow[i]);
                }
            }
        });
        Ok(())
    }

    fn gelu_forward(&self, pre: &[f32], out: &mut [f32]) -> Result<()> {
        check("gelu_forward", out.len() == pre.len(), || format!("pre {} out {}", pre.len(), out.len()))?;
        out.par_chunks_mut(4096).enumerate().for_each(|(chunk, o)| {
            let base = chunk * 4096;
            for (i, v) in o.iter_mut().enumerate() {
                *v = gelu(pre[base + i]);
            }
        });
        Ok(())
    }

    fn gelu_backward(&self, pre: &[f32], dout: &[f32], dpre: &mut [f32]) -> Result<()> {
        check("gelu_backward", dout.len() == pre.len() && dpre.len() == pre.len(), || {
            format!("pre {} dout {} dpre {}", pre.len(), dout.len(), dpre.len())
        })?;
        dpre.par_chunks_mut(4096).enumerate().for_each(|(chunk, d)| {
            let base = chunk * 4096;
            for (i, v) in d.iter_mut().enumerate() {
                *v = dout[base + i] * gelu_grad(pre[base + i]);
            }
        });
        Ok(())
    }

    fn bias_gelu_backward(&self, pre: &[f32], dout: &[f32], dpre: &mut [f32], dbias: &mut [f32]) -> Result<()> {
        let c = dbias.len();
        check(
            "bias_gelu_backward",
            c > 0 && pre.len().is_multiple_of(c) && dout.len() == pre.len() && dpre.len() == pre.len(),
            || format!("pre {} dout {} dpre {} dbias {c}", pre.len(), dout.len(), dpre.len()),
        )?;
        dpre.par_chunks_mut(c * ROW_CHUNK).enumerate().for_each(|(chunk, d)| {
            let base = chunk * c * ROW_CHUNK;
            for (i, v) in d.iter_mut().enumerate() {
                *v = dout[base + i] * gelu_grad(pre[base + i]);
            }
        });
        let sums = column_sums(dpre, c);
        dbias.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn gelu_matches_reference_values() {
        // Phi from the f64 erf of libm: an independent path from the f32 kernel.
        let xs = randn(257, 3.0, 31);
        let got: Vec<f32> = xs.iter().map(|&x| gelu(x)).collect();
        let want: Vec<f32> = xs.iter().map(|&x| crate::reference::gelu(x as f64) as f32).collect();
        let got_grad: Vec<f32> = xs.iter().map(|&x| gelu_grad(x)).collect();
        let want_grad: Vec<f32> = xs.iter().map(|&x| crate::reference::gelu_grad(x as f64) as f32).collect();
        assert_close("gelu'", &got_grad, &want_grad, 1e-5);
        assert_close("gelu", &got, &want, 1e-6);
    }

    #[test]
    fn bias_gelu_backward_matches_finite_differences() {
        let (rows, c) = (7, 13);
        let x = randn(rows * c, 2.0, 32);
        let bias = randn(c, 1.0, 33);
        let w = randn(rows * c, 1.0, 34);
        let f = |x: &[f32], b: &[f32]| {
            let mut pre = x.to_vec();
            let mut out = vec![0.0; x.len()];
            Cpu.bias_gelu_forward(&mut pre, b, &mut out).unwrap();
            dot(&out, &w)
        };
        let mut pre = x.clone();
        let mut out = vec![0.0; x.len()];
        Cpu.bias_gelu_forward(&mut pre, &bias, &mut out).unwrap();
        let mut dpre = vec![f32::NAN; x.len()];
        let mut db = vec![1.0; c];
        Cpu.bias_gelu_backward(&pre, &w, &mut dpre, &mut db).unwrap();
        let nx = numeric_grad(&x, 1e-2, |xp| f(xp, &bias));
        let nb = numeric_grad(&bias, 1e-2, |bp| f(&x, bp));
        assert_close("dpre", &dpre, &nx, 2e-3);
        let db_only: Vec<f32> = db.iter().map(|v| v - 1.0).collect();
        assert_close("dbias", &db_only, &nb, 2e-3);
    }
}
