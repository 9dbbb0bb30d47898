//! Multi-head scaled-dot-product attention on the CPU, forward and backward side by side.
//!
//! Shapes: q `[B, Tq, H*D]`, k and v `[B, Tk, H*D]` (heads interleaved; tokens `q_stride` and
//! `kv_stride` apart, dq/dk/dv laid out as q/k/v), key_mask `[B, Tk]` (1 real, 0 padding), probs
//! `[B, H, Tq, Tk]` (the saved state), out `[B, Tq, H*D]` contiguous.
//! forward:  `S = q_h k_h^T / sqrt(D)`; masked keys (padding, or j > i when causal) get -1e30
//!           (so a fully masked row becomes uniform, as transformers' finfo.min mask does);
//!           `P = softmax(S)` (saved), `Pd = dropout(P)`, `out_h = Pd v_h`.
//! backward: `dPd = dout_h v_h^T`, `dv_h = Pd^T dout_h`, `dP = dropout(dPd)`,
//!           `dS = P * (dP - rowsum(dP * P))`, `dq_h = dS k_h / sqrt(D)` (assigned),
//!           `dk_h = dS^T q_h / sqrt(D)` (dq, dk and dv assigned).
//! Dropout element (b, h, i, j) uses counter `((b*H + h)*Tq + i)*Tk + j` of `seed`.
//! Work is split over the batch: each task owns one batch item's rows of out/dq/dk/dv.

use rayon::prelude::*;

use super::Cpu;
use super::matmul::{Strided, matmul};
use crate::{AttentionOps, AttentionShape, Result, check_len, rng};

const MASKED: f32 = -1.0e30;

/// Dropout factor of probability element (b, h, i, j): 0 or 1/(1-p).
#[inline]
fn keep(s: &AttentionShape, b: usize, h: usize, i: usize, j: usize) -> f32 {
    let idx = (((b * s.heads + h) * s.tq + i) * s.tk + j) as u64;
    if rng::uniform(s.seed, idx) >= s.dropout { 1.0 / (1.0 - s.dropout) } else { 0.0 }
}

/// Batch item `b`'s rows of a `[B, T, ...]` view whose tokens are `stride` apart (to the end of
/// the view: the last row may be short of a full stride).
fn item(x: &[f32], b: usize, t: usize, stride: usize) -> &[f32] {
    &x[b * t * stride..]
}

impl AttentionOps for Cpu {
    fn attention_saved_len(&self, s: &AttentionShape) -> usize {
        s.probs_len()
    }

    fn attention_forward(
        &self,
        s: AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: &[f32],
        probs: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        s.check("attention_forward", q.len(), k.len(), v.len(), key_mask.len())?;
        check_len("attention_forward", "probs", probs.len(), s.probs_len())?;
        check_len("attention_forward", "out", out.len(), s.out_len())?;
        if s.out_len() == 0 {
            return Ok(());
        }
        let (c, d, tq, tk, ldq, ldkv) = (s.width(), s.head_dim, s.tq, s.tk, s.q_stride, s.kv_stride);
        let scale = 1.0 / (d as f32).sqrt();
        let per_b_probs = s.heads * tq * tk;
        out.par_chunks_mut(tq * c).zip(probs.par_chunks_mut(per_b_probs)).enumerate().for_each(|(b, (ob, pb))| {
            let (qb, kb, vb) = (item(q, b, tq, ldq), item(k, b, tk, ldkv), item(v, b, tk, ldkv));
            let mask = &key_mask[b * tk..(b + 1) * tk];
            let mut pd = vec![0.0f32; tq * tk];
            for h in 0..s.heads {
                let p = &mut pb[h * tq * tk..(h + 1) * tq * tk];
                let head = Strided::row_major(tq, d, ldq);
                let khead_t = Strided::row_major(tk, d, ldkv).t();
                matmul(p, Strided::row_major(tq, tk, tk), 0.0, scale, &qb[h * d..], head, &kb[h * d..], khead_t, false);
                for i in 0..tq {
                    let row = &mut p[i * tk..(i + 1) * tk];
                    for j in 0..tk {
                        if mask[j] == 0.0 || (s.causal && j > i) {
                            row[j] = MASKED;
                        }
                    }
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    for (j, x) in row.iter_mut().enumerate() {
                        *x *= inv;
                        pd[i * tk + j] = if s.dropout > 0.0 { *x * keep(&s, b, h, i, j) } else { *x };
                    }
                }
                matmul(
                    &mut ob[h * d..],
                    Strided::row_major(tq, d, c),
                    0.0,
                    1.0,
                    &pd,
                    Strided::row_major(tq, tk, tk),
                    &vb[h * d..],
                    Strided::row_major(tk, d, ldkv),
                    false,
                );
            }
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        s: AttentionShape,
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: &[f32],
        _out: &[f32],
        probs: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        s.check(OP, q.len(), k.len(), v.len(), key_mask.len())?;
        check_len(OP, "probs", probs.len(), s.probs_len())?;
        check_len(OP, "dout", dout.len(), s.out_len())?;
        s.check_q(OP, "dq", dq.len())?;
        s.check_kv(OP, "dk", dk.len())?;
        s.check_kv(OP, "dv", dv.len())?;
        if s.out_len() == 0 {
            return Ok(());
        }
        let (c, d, tq, tk, ldq, ldkv) = (s.width(), s.head_dim, s.tq, s.tk, s.q_stride, s.kv_stride);
        let scale = 1.0 / (d as f32).sqrt();
        let per_b_probs = s.heads * tq * tk;
        // A strided view's last batch item may be short of a full chunk; `take` drops nothing real.
        let dq_items = dq.par_chunks_mut(tq * ldq).take(s.batch);
        let dkv_items = dk.par_chunks_mut(tk * ldkv).zip(dv.par_chunks_mut(tk * ldkv)).take(s.batch);
        dq_items.zip(dkv_items).enumerate().for_each(|(b, (dqb, (dkb, dvb)))| {
            let (qb, kb, vb) = (item(q, b, tq, ldq), item(k, b, tk, ldkv), item(v, b, tk, ldkv));
            let gb = &dout[b * tq * c..(b + 1) * tq * c];
            let pb = &probs[b * per_b_probs..(b + 1) * per_b_probs];
            let mut pd = vec![0.0f32; tq * tk];
            let mut dp = vec![0.0f32; tq * tk];
            let rows = Strided::row_major(tq, tk, tk);
            for h in 0..s.heads {
                let p = &pb[h * tq * tk..(h + 1) * tq * tk];
                for i in 0..tq {
                    for j in 0..tk {
                        pd[i * tk + j] =
                            if s.dropout > 0.0 { p[i * tk + j] * keep(&s, b, h, i, j) } else { p[i * tk + j] };
                    }
                }
                // dPd = dout_h v_h^T ; dv_h = Pd^T dout_h
                matmul(
                    &mut dp,
                    rows,
                    0.0,
                    1.0,
                    &gb[h * d..],
                    Strided::row_major(tq, d, c),
                    &vb[h * d..],
                    Strided::row_major(tk, d, ldkv).t(),
                    false,
                );
                matmul(
                    &mut dvb[h * d..],
                    Strided::row_major(tk, d, ldkv),
                    0.0,
                    1.0,
                    &pd,
                    rows.t(),
                    &gb[h * d..],
                    Strided::row_major(tq, d, c),
                    false,
                );
                for i in 0..tq {
                    let mut dot = 0.0f32;
                    for j in 0..tk {
                        let mut g = dp[i * tk + j];
                        if s.dropout > 0.0 {
                            g *= keep(&s, b, h, i, j);
                        }
                        dp[i * tk + j] = g;
                        dot += g * p[i * tk + j];
                    }
                    for j in 0..tk {
                        dp[i * tk + j] = p[i * tk + j] * (dp[i * tk + j] - dot);
                    }
                }
                // dq_h = dS k_h * scale ; dk_h = dS^T q_h * scale
                matmul(
                    &mut dqb[h * d..],
                    Strided::row_major(tq, d, ldq),
                    0.0,
                    scale,
                    &dp,
                    rows,
                    &kb[h * d..],
                    Strided::row_major(tk, d, ldkv),
                    false,
                );
                matmul(
                    &mut dkb[h * d..],
                    Strided::row_major(tk, d, ldkv),
                    0.0,
                    scale,
                    &dp,
                    rows.t(),
                    &qb[h * d..],
                    Strided::row_major(tq, d, ldq),
                    false,
                );
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    fn shape(causal: bool, dropout: f32) -> AttentionShape {
        AttentionShape::new(2, 3, 5, 7, if causal { 7 } else { 6 })
            .with_causal(causal)
            .with_dropout(dropout, seed_for(81))
    }

    fn mask_for(s: &AttentionShape) -> Vec<f32> {
        // Second batch item has its last two keys padded.
        (0..s.batch * s.tk).map(|i| if i / s.tk == 1 && i % s.tk >= s.tk - 2 { 0.0 } else { 1.0 }).collect()
    }

    fn forward(s: &AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let mut probs = vec![0.0; s.probs_len()];
        let mut out = vec![0.0; q.len()];
        Cpu.attention_forward(*s, q, k, v, &mask_for(s), &mut probs, &mut out).unwrap();
        out
    }

    #[test]
    fn forward_matches_naive_f64() {
        for causal in [false, true] {
            let s = shape(causal, 0.0);
            let c = s.heads * s.head_dim;
            let q = randn(s.batch * s.tq * c, 1.0, 82);
            let k = randn(s.batch * s.tk * c, 1.0, 83);
            let v = randn(s.batch * s.tk * c, 1.0, 84);
            let out = forward(&s, &q, &k, &v);
            let mut want = vec![0.0f32; out.len()];
            let mut probs = vec![0.0f32; s.probs_len()];
            crate::reference::attention_forward(s, &q, &k, &v, &mask_for(&s), &mut probs, &mut want);
            assert_close(&format!("attention causal={causal}"), &out, &want, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences_with_dropout() {
        for (causal, p) in [(false, 0.0), (true, 0.0), (false, 0.25)] {
            let s = shape(causal, p);
            let c = s.heads * s.head_dim;
            let q = randn(s.batch * s.tq * c, 1.0, 85);
            let k = randn(s.batch * s.tk * c, 1.0, 86);
            let v = randn(s.batch * s.tk * c, 1.0, 87);
            let w = randn(q.len(), 1.0, 88);
            let mut probs = vec![0.0; s.probs_len()];
            let mut out = vec![0.0; q.len()];
            Cpu.attention_forward(s, &q, &k, &v, &mask_for(&s), &mut probs, &mut out).unwrap();
            let mut dq = vec![f32::NAN; q.len()];
            // dk and dv are assigned: garbage in, the gradient out.
            let (mut dk, mut dv) = (randn(k.len(), 1.0, 89), vec![f32::NAN; v.len()]);
            let mask = mask_for(&s);
            Cpu.attention_backward(s, &w, &q, &k, &v, &mask, &out, &probs, &mut dq, &mut dk, &mut dv).unwrap();
            let nq = numeric_grad(&q, 1e-2, |x| dot(&forward(&s, x, &k, &v), &w));
            let nk = numeric_grad(&k, 1e-2, |x| dot(&forward(&s, &q, x, &v), &w));
            let nv = numeric_grad(&v, 1e-2, |x| dot(&forward(&s, &q, &k, x), &w));
            assert_close(&format!("dq causal={causal} p={p}"), &dq, &nq, 3e-3);
            assert_close(&format!("dk causal={causal} p={p}"), &dk, &nk, 3e-3);
            assert_close(&format!("dv causal={causal} p={p}"), &dv, &nv, 3e-3);
        }
    }

    /// Rows `ld` apart holding `x`'s `c`-wide rows at column `at`, other columns junk (the last
    /// row stops after its `c` columns, as a view of a fused projection would).
    fn spread(x: &[f32], c: usize, ld: usize, at: usize) -> Vec<f32> {
        let rows = x.len() / c;
        let mut y = randn(rows * ld, 9.0, 90);
        for (r, row) in x.chunks(c).enumerate() {
            y[r * ld + at..r * ld + at + c].copy_from_slice(row);
        }
        y[at..(rows - 1) * ld + at + c].to_vec()
    }

    fn gather(y: &[f32], c: usize, ld: usize) -> Vec<f32> {
        y.chunks(ld).flat_map(|row| row[..c].to_vec()).collect()
    }

    #[test]
    fn strided_q_k_v_and_grads_match_contiguous() {
        let s = shape(true, 0.25);
        let c = s.width();
        let (ldq, ldkv) = (3 * c, 2 * c + 3);
        let q = randn(s.batch * s.tq * c, 1.0, 91);
        let k = randn(s.batch * s.tk * c, 1.0, 92);
        let v = randn(s.batch * s.tk * c, 1.0, 93);
        let dout = randn(q.len(), 1.0, 94);
        let mask = mask_for(&s);
        let run = |s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], dk0: Vec<f32>| {
            let mut probs = vec![0.0; s.probs_len()];
            let mut out = vec![0.0; s.out_len()];
            Cpu.attention_forward(s, q, k, v, &mask, &mut probs, &mut out).unwrap();
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], dk0.clone(), dk0);
            Cpu.attention_backward(s, &dout, q, k, v, &mask, &out, &probs, &mut dq, &mut dk, &mut dv).unwrap();
            (out, dq, dk, dv)
        };
        let dk0 = randn(k.len(), 1.0, 95);
        let (out, dq, dk, dv) = run(s, &q, &k, &v, dk0.clone());
        let strided = s.with_strides(ldq, ldkv);
        let (qs, ks, vs) = (spread(&q, c, ldq, c), spread(&k, c, ldkv, 0), spread(&v, c, ldkv, 3));
        let (out2, dq2, dk2, dv2) = run(strided, &qs, &ks, &vs, spread(&dk0, c, ldkv, 0));
        assert_eq!(out, out2);
        assert_eq!(dq, gather(&dq2, c, ldq));
        assert_eq!(dk, gather(&dk2, c, ldkv));
        assert_eq!(dv, gather(&dv2, c, ldkv));
        // A view one element short (or long past its last row) is a shape error, not a panic.
        let mut probs = vec![0.0; s.probs_len()];
        let mut out = vec![0.0; s.out_len()];
        let short = &qs[..qs.len() - 1];
        assert!(Cpu.attention_forward(strided, short, &ks, &vs, &mask, &mut probs, &mut out).is_err());
        let long = spread(&q, c, ldq, 0);
        let long = [long.as_slice(), &[0.0; 2 * 15 + 1]].concat();
        assert!(Cpu.attention_forward(strided, &long, &ks, &vs, &mask, &mut probs, &mut out).is_err());
    }
}
