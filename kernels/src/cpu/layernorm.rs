//! LayerNorm family on the CPU, over the last dimension `c` of `[rows, c]`.
//!
//! forward:  `mean = avg(x)`, `rstd = 1/sqrt(var(x) + eps)` (biased variance),
//!           `out = (x - mean) * rstd * gamma + beta`; mean and rstd `[rows]` are saved.
//! backward: `xhat = (x - mean) * rstd`, `g = dout * gamma`,
//!           `dx (= or +=) rstd * (g - avg(g) - xhat * avg(g * xhat))`,
//!           `dgamma += sum_rows(dout * xhat)`, `dbeta += sum_rows(dout)` (parameter grads).

use rayon::prelude::*;

use super::{Cpu, ROW_CHUNK, check};
use crate::{LayerNormOps, Result};

impl LayerNormOps for Cpu {
    fn layernorm_forward(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) -> Result<()> {
        let c = gamma.len();
        let rows = mean.len();
        check(
            "layernorm_forward",
            c > 0 && beta.len() == c && x.len() == rows * c && out.len() == x.len() && rstd.len() == rows,
            || {
                format!(
                    "x {} out {} gamma {} beta {} mean {} rstd {}",
                    x.len(),
                    out.len(),
                    c,
                    beta.len(),
                    rows,
                    rstd.len()
                )
            },
        )?;
        out.par_chunks_mut(c * ROW_CHUNK)
            .zip(mean.par_chunks_mut(ROW_CHUNK).zip(rstd.par_chunks_mut(ROW_CHUNK)))
            .enumerate()
            .for_each(|(chunk, (orows, (ms, rs)))| {
                for (r, orow) in orows.chunks_mut(c).enumerate() {
                    let row = chunk * ROW_CHUNK + r;
                    let xr = &x[row * c..(row + 1) * c];
                    let m = xr.iter().sum::<f32>() / c as f32;
                    let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / c as f32;
                    let s = 1.0 / (var + eps).sqrt();
                    for i in 0..c {
                        orow[i] = (xr[i] - m) * s * gamma[i] + beta[i];
                    }
                    ms[r] = m;
                    rs[r] = s;
                }
            });
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dout: &[f32],
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        accumulate_dx: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<()> {
        let c = gamma.len();
        let rows = mean.len();
        check(
            "layernorm_backward",
            c > 0
                && x.len() == rows * c
                && dout.len() == x.len()
                && dx.len() == x.len()
                && rstd.len() == rows
                && dgamma.len() == c
                && dbeta.len() == c,
            || format!("x {} dout {} dx {} gamma {} rows {}", x.len(), dout.len(), dx.len(), c, rows),
        )?;
        let partials = dx
            .par_chunks_mut(c * ROW_CHUNK)
            .enumerate()
            .map(|(chunk, dxrows)| {
                let mut acc = vec![0.0f32; 2 * c];
                for (r, dxr) in dxrows.chunks_mut(c).enumerate() {
                    let row = chunk * ROW_CHUNK + r;
                    let xr = &x[row * c..(row + 1) * c];
                    let dr = &dout[row * c..(row + 1) * c];
                    let (m, s) = (mean[row], rstd[row]);
                    let mut sum_g = 0.0f32;
                    let mut sum_gx = 0.0f32;
                    for i in 0..c {
                        let xhat = (xr[i] - m) * s;
                        let g = dr[i] * gamma[i];
                        sum_g += g;
                        sum_gx += g * xhat;
                        acc[i] += dr[i] * xhat;
                        acc[c + i] += dr[i];
                    }
                    let (mg, mgx) = (sum_g / c as f32, sum_gx / c as f32);
                    for i in 0..c {
                        let xhat = (xr[i] - m) * s;
                        let v = s * (dr[i] * gamma[i] - mg - xhat * mgx);
                        if accumulate_dx { dxr[i] += v } else { dxr[i] = v }
                    }
                }
                acc
            })
            .collect::<Vec<_>>()
            // Added in chunk order so the result does not depend on the thread schedule.
            .into_iter()
            .fold(vec![0.0f32; 2 * c], |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            });
        dgamma.iter_mut().zip(&partials[..c]).for_each(|(d, p)| *d += p);
        dbeta.iter_mut().zip(&partials[c..]).for_each(|(d, p)| *d += p);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    fn forward(x: &[f32], g: &[f32], b: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        Cpu.layernorm_forward(x, g, b, 1e-5, &mut out, &mut m, &mut r).unwrap();
        out
    }

    #[test]
    fn forward_matches_f64_reference() {
        let (rows, c) = (37, 29);
        let x = randn(rows * c, 2.0, 21);
        let g = randn(c, 1.0, 22);
        let b = randn(c, 1.0, 23);
        let out = forward(&x, &g, &b, rows);
        let mut want = vec![0.0f32; x.len()];
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        crate::reference::layernorm_forward(&x, &g, &b, 1e-5, &mut want, &mut m, &mut r);
        assert_close("layernorm forward", &out, &want, 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, c) = (5, 19);
        let x = randn(rows * c, 1.5, 24);
        let g = randn(c, 1.0, 25);
        let b = randn(c, 1.0, 26);
        let w = randn(rows * c, 1.0, 27);
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        let mut out = vec![0.0; x.len()];
        Cpu.layernorm_forward(&x, &g, &b, 1e-5, &mut out, &mut m, &mut r).unwrap();
        let dx0 = randn(x.len(), 1.0, 28);
        let mut dx = dx0.clone();
        let dg0 = randn(c, 1.0, 29);
        let (mut dg, mut db) = (dg0.clone(), vec![0.5; c]);
        Cpu.layernorm_backward(&w, &x, &g, &m, &r, &mut dx, true, &mut dg, &mut db).unwrap();
        let nx = numeric_grad(&x, 1e-2, |xp| dot(&forward(xp, &g, &b, rows), &w));
        let ng = numeric_grad(&g, 1e-2, |gp| dot(&forward(&x, gp, &b, rows), &w));
        let nb = numeric_grad(&b, 1e-2, |bp| dot(&forward(&x, &g, bp, rows), &w));
        let dx_only: Vec<f32> = dx.iter().zip(&dx0).map(|(a, b)| a - b).collect();
        let dg_only: Vec<f32> = dg.iter().zip(&dg0).map(|(a, b)| a - b).collect();
        let db_only: Vec<f32> = db.iter().map(|a| a - 0.5).collect();
        assert_close("dx", &dx_only, &nx, 2e-3);
        assert_close("dgamma", &dg_only, &ng, 2e-3);
        assert_close("dbeta", &db_only, &nb, 2e-3);
    }
}
