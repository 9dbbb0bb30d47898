//! Fused AdamW and the squared-norm reduction on the CPU.
//!
//! Per element, in torch.optim.AdamW's order (decoupled weight decay first):
//! `p -= lr*wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;`
//! `p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`.
//! `sum_squares` accumulates in f64 for the global gradient norm.

use rayon::prelude::*;

use super::{Cpu, check};
use crate::{AdamW, OptimizerOps, Result};

const CHUNK: usize = 1 << 14;

impl OptimizerOps for Cpu {
    fn adamw(&self, h: AdamW, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
        let n = params.len();
        check("adamw", grads.len() == n && m.len() == n && v.len() == n && h.step >= 1, || {
            format!("params {n} grads {} m {} v {} step {}", grads.len(), m.len(), v.len(), h.step)
        })?;
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let step_size = h.lr / bc1;
        let decay = 1.0 - h.lr * h.weight_decay;
        params
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .zip(grads.par_chunks(CHUNK))
            .for_each(|((p, (m, v)), g)| {
                for i in 0..p.len() {
                    p[i] *= decay;
                    m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
                    v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
                    let denom = v[i].sqrt() / bc2_sqrt + h.eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
        Ok(())
    }

    fn sum_squares(&self, x: &[f32]) -> Result<f64> {
        // Partials in chunk order, summed sequentially: the same bits whatever the thread schedule.
        let partials: Vec<f64> =
            x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).collect();
        Ok(partials.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;
    use crate::{Memory, clip_grad_norm};

    #[test]
    fn adamw_matches_f64_reference_over_steps() {
        let n = 20_011;
        let mut p = randn(n, 1.0, 61);
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let mut want = p.clone();
        let (mut m_ref, mut v_ref) = (m.clone(), v.clone());
        for step in 1..=3u64 {
            let g = randn(n, 0.1, 62 + step);
            let h = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
            Cpu.adamw(h, &mut p, &g, &mut m, &mut v).unwrap();
            crate::reference::adamw(h, &mut want, &g, &mut m_ref, &mut v_ref);
        }
        assert_close("adamw", &p, &want, 1e-5);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let g = randn(3001, 1.0, 66);
        let norm64 = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let mut buf = Cpu.upload(&g).unwrap();
        let norm = clip_grad_norm(&Cpu, &mut buf, 1.0).unwrap();
        assert!((norm as f64 - norm64).abs() / norm64 < 1e-6);
        let after = buf.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        assert!((after - 1.0).abs() < 1e-4, "clipped norm {after}");
        let mut small = Cpu.upload(&g).unwrap();
        clip_grad_norm(&Cpu, &mut small, 1e9).unwrap();
        assert_eq!(small, g, "no clipping under the threshold");
    }
}
