//! Fused AdamW and the squared-norm reduction on the CPU.
//!
//! Per element, in torch.optim.AdamW's order (decoupled weight decay first):
//! `p -= lr*wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;`
//! `p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`.
//! `sum_squares` accumulates in f64 for the global gradient norm.
//! `adamw_flat` is the oracle of the one-launch device update: the norm from `sum_squares`,
//! then per chunk of the segment table the same per-element update on `g * coef` (the same
//! bits as `clip_grad_norm`'s in-place `scale` followed by `adamw`, tensor by tensor).

use rayon::prelude::*;

use super::{Cpu, check};
use crate::{AdamW, FlatSegments, OptimizerOps, Result, clip_coef};

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

    fn adamw_flat(
        &self,
        h: AdamW,
        max_norm: f32,
        segs: &FlatSegments<Vec<i32>>,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        norm: &mut [f32],
        copy: Option<&mut [f32]>,
    ) -> Result<()> {
        let n = segs.len;
        check(
            "adamw_flat",
            copy.as_ref().is_none_or(|c| c.len() == n)
                && params.len() == n
                && grads.len() == n
                && m.len() == n
                && v.len() == n
                && norm.len() == 1
                && segs.table.len() == 3 * segs.chunks
                && h.step >= 1,
            || {
                format!(
                    "segments over {n}: params {} grads {} m {} v {} norm {} table {} step {}",
                    params.len(),
                    grads.len(),
                    m.len(),
                    v.len(),
                    norm.len(),
                    segs.table.len(),
                    h.step
                )
            },
        )?;
        let nrm = self.sum_squares(grads)?.sqrt() as f32;
        norm[0] = nrm;
        let coef = clip_coef(max_norm, nrm).unwrap_or(1.0);
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
        let step_size = h.lr / bc1;
        let decay = 1.0 - h.lr * h.weight_decay;
        // Split the buffers at the chunk boundaries (ascending and disjoint, as the table is built).
        type Work<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32], &'a [f32], f32);
        let mut work: Vec<Work<'_>> = Vec::with_capacity(segs.chunks);
        let (mut p_rest, mut m_rest, mut v_rest, mut g_rest) = (&mut params[..], m, v, grads);
        let mut at = 0usize;
        for c in segs.table.chunks_exact(3) {
            let (start, len) = (c[0] as usize, c[1] as usize);
            check("adamw_flat", c[0] >= 0 && c[1] >= 0 && start >= at && start + len <= n, || {
                format!("chunk ({}, {}) after {at} in {n}", c[0], c[1])
            })?;
            let skip = start - at;
            let (_, p) = std::mem::take(&mut p_rest).split_at_mut(skip);
            let (p, pr) = p.split_at_mut(len);
            let (_, mm) = std::mem::take(&mut m_rest).split_at_mut(skip);
            let (mm, mr) = mm.split_at_mut(len);
            let (_, vv) = std::mem::take(&mut v_rest).split_at_mut(skip);
            let (vv, vr) = vv.split_at_mut(len);
            let (g, gr) = g_rest[skip..].split_at(len);
            (p_rest, m_rest, v_rest, g_rest) = (pr, mr, vr, gr);
            work.push((p, mm, vv, g, if c[2] != 0 { decay } else { 1.0 }));
            at = start + len;
        }
        work.into_par_iter().for_each(|(p, m, v, g, decay)| {
            for i in 0..p.len() {
                let gi = g[i] * coef;
                p[i] *= decay;
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + h.eps;
                p[i] -= step_size * m[i] / denom;
            }
        });
        if let Some(copy) = copy {
            for c in segs.table.chunks_exact(3) {
                let r = c[0] as usize..(c[0] + c[1]) as usize;
                copy[r.clone()].copy_from_slice(&params[r]);
            }
        }
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
    use crate::{FlatSegments, Memory, clip_grad_norm};

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

    /// The one-call update is bit-for-bit `clip_grad_norm` then `adamw` range by range, with
    /// decay only on decaying ranges, and leaves the gaps (frozen tensors) alone.
    #[test]
    fn adamw_flat_writes_the_copy_of_updated_elements_only() {
        let n = 20_011;
        let segs = [(3..4_000, true), (5_000..20_000, false)];
        let table = FlatSegments::new(&Cpu, n, &segs).unwrap();
        let (mut p, g, mut m) = (randn(n, 1.0, 81), randn(n, 0.1, 82), randn(n, 0.01, 83));
        let mut v: Vec<f32> = randn(n, 0.01, 84).iter().map(|x| x * x).collect();
        let (stale, mut norm) = (randn(n, 1.0, 85), vec![0.0f32]);
        let mut copy = stale.clone();
        let h = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 };
        Cpu.adamw_flat(h, 1.0, &table, &mut p, &g, &mut m, &mut v, &mut norm, Some(&mut copy)).unwrap();
        for i in 0..n {
            let updated = segs.iter().any(|(r, _)| r.contains(&i));
            assert_eq!(copy[i], if updated { p[i] } else { stale[i] }, "element {i}");
        }
    }

    #[test]
    fn adamw_flat_is_clip_then_per_range_adamw_bitwise() {
        let n = 100_003;
        let segs = [(0..17, true), (17..16_401, false), (20_000..70_001, true), (70_001..100_000, false)];
        for max_norm in [0.0f32, 1.0, 1e9] {
            let (p0, g0) = (randn(n, 1.0, 71), randn(n, 0.1, 72));
            let (m0, v0) = (randn(n, 0.01, 73), randn(n, 0.01, 74).iter().map(|x| x * x).collect::<Vec<_>>());
            let h = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 2 };
            let table = FlatSegments::new(&Cpu, n, &segs).unwrap();
            assert_eq!(table.elems, 17 + 16_384 + 50_001 + 29_999);
            let (mut p, mut m, mut v, mut norm) = (p0.clone(), m0.clone(), v0.clone(), vec![0.0f32]);
            Cpu.adamw_flat(h, max_norm, &table, &mut p, &g0, &mut m, &mut v, &mut norm, None).unwrap();
            let (mut pw, mut gw, mut mw, mut vw) = (p0.clone(), g0.clone(), m0.clone(), v0.clone());
            let want_norm = clip_grad_norm(&Cpu, &mut gw, max_norm).unwrap();
            for (r, decay) in &segs {
                let h = AdamW { weight_decay: if *decay { h.weight_decay } else { 0.0 }, ..h };
                let r = r.clone();
                Cpu.adamw(h, &mut pw[r.clone()], &gw[r.clone()], &mut mw[r.clone()], &mut vw[r]).unwrap();
            }
            assert_eq!(norm[0].to_bits(), want_norm.to_bits(), "max_norm {max_norm}");
            assert!(p == pw && m == mw && v == vw, "max_norm {max_norm}: not the same bits");
            assert_eq!(p[16_500], p0[16_500], "a gap is left alone");
        }
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
