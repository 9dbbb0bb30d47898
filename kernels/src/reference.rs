//! Independent f64 references of every op family, written from the math in the trait docs
//! (not from any backend): the yardstick the CPU fp32 oracle itself is tested against, by the
//! kernels' own tests and by the conformance harness (`conformance::Reference::F64`).
//!
//! Each function has the signature of its op on host slices: it reads the same inputs, computes
//! in f64, and rounds once when it stores into the f32 output, so "assigned" outputs are
//! overwritten and "accumulating" ones get the f64 sum added to their initial value. Loops are
//! plain and sequential: these run on test-sized inputs, and obviousness beats speed here.

use crate::{AdamW, AttentionShape, GemmShape, IGNORE_INDEX, Operand, rng};

/// `C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b]`, with strides as [`crate::GemmOps::gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(s: GemmShape, alpha: f32, a: &[f32], op_a: Operand, b: &[f32], op_b: Operand, beta: f32, c: &mut [f32]) {
    // Element (row, col) of op(X) for batch item `bi`.
    let at = |x: &[f32], op: Operand, bi: usize, row: usize, col: usize| -> f64 {
        let (r, c) = if op.trans { (col, row) } else { (row, col) };
        x[bi * op.batch_stride + r * op.ld + c] as f64
    };
    for bi in 0..s.batch {
        for i in 0..s.m {
            for j in 0..s.n {
                let dot: f64 = (0..s.k).map(|p| at(a, op_a, bi, i, p) * at(b, op_b, bi, p, j)).sum();
                let idx = bi * s.batch_stride_c + i * s.ldc + j;
                c[idx] = (alpha as f64 * dot + beta as f64 * c[idx] as f64) as f32;
            }
        }
    }
}

/// `y[r, :] += bias`.
pub fn add_bias(y: &mut [f32], bias: &[f32], cols: usize) {
    for (i, v) in y.iter_mut().enumerate() {
        *v = (*v as f64 + bias[i % cols] as f64) as f32;
    }
}

/// Column sums of a `rows x cols` matrix, in f64.
fn column_sums(x: &[f32], cols: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; cols];
    for (i, &v) in x.iter().enumerate() {
        sums[i % cols] += v as f64;
    }
    sums
}

/// `dbias += sum over rows of dy`.
pub fn bias_grad(dy: &[f32], dbias: &mut [f32], cols: usize) {
    for (d, s) in dbias.iter_mut().zip(column_sums(dy, cols)) {
        *d = (*d as f64 + s) as f32;
    }
}

/// `out[i, :] (= or +=) table[ids[i], :]`.
pub fn embedding_forward(ids: &[i32], table: &[f32], dim: usize, out: &mut [f32], accumulate: bool) {
    for (i, &id) in ids.iter().enumerate() {
        let row = &table[id as usize * dim..][..dim];
        for (o, &t) in out[i * dim..][..dim].iter_mut().zip(row) {
            *o = if accumulate { (*o as f64 + t as f64) as f32 } else { t };
        }
    }
}

/// `dtable[ids[i], :] += dout[i, :]`, repeats summed in f64 before the one rounding.
pub fn embedding_backward(ids: &[i32], dout: &[f32], dim: usize, dtable: &mut [f32]) {
    let mut sums = vec![0.0f64; dtable.len()];
    for (i, &id) in ids.iter().enumerate() {
        for (s, &g) in sums[id as usize * dim..][..dim].iter_mut().zip(&dout[i * dim..][..dim]) {
            *s += g as f64;
        }
    }
    for (d, s) in dtable.iter_mut().zip(sums) {
        *d = (*d as f64 + s) as f32;
    }
}

/// LayerNorm over rows of `gamma.len()`: `out = (x - mean) / sqrt(var + eps) * gamma + beta`,
/// with the biased variance; saves the mean and `rstd = 1 / sqrt(var + eps)` per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let c = gamma.len();
    for (r, row) in x.chunks(c).enumerate() {
        let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for (i, &v) in row.iter().enumerate() {
            out[r * c + i] = ((v as f64 - m) * rs * gamma[i] as f64 + beta[i] as f64) as f32;
        }
        (mean[r], rstd[r]) = (m as f32, rs as f32);
    }
}

/// LayerNorm backward from the saved statistics: with `xhat = (x - mean) * rstd` and
/// `g = dout * gamma`, `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` (assigned, or added
/// when `accumulate_dx`), `dgamma += sum_rows dout * xhat`, `dbeta += sum_rows dout`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dout: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    accumulate_dx: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let c = gamma.len();
    let (mut dg, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
    for r in 0..x.len() / c {
        let (m, rs) = (mean[r] as f64, rstd[r] as f64);
        let xhat: Vec<f64> = x[r * c..][..c].iter().map(|&v| (v as f64 - m) * rs).collect();
        let dy = &dout[r * c..][..c];
        let g: Vec<f64> = dy.iter().zip(gamma).map(|(&d, &w)| d as f64 * w as f64).collect();
        let mean_g = g.iter().sum::<f64>() / c as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for i in 0..c {
            let d = rs * (g[i] - mean_g - xhat[i] * mean_gx);
            let o = &mut dx[r * c + i];
            *o = if accumulate_dx { (*o as f64 + d) as f32 } else { d as f32 };
            dg[i] += dy[i] as f64 * xhat[i];
            db[i] += dy[i] as f64;
        }
    }
    for i in 0..c {
        dgamma[i] = (dgamma[i] as f64 + dg[i]) as f32;
        dbeta[i] = (dbeta[i] as f64 + db[i]) as f32;
    }
}

/// Exact GELU, `x * Phi(x)`.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// `d/dx gelu(x) = Phi(x) + x * phi(x)`.
pub fn gelu_grad(x: f64) -> f64 {
    let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)) + x * phi
}

/// `pre += bias`, then `out = gelu(pre)` (from the rounded `pre`, as the op keeps it).
pub fn bias_gelu_forward(pre: &mut [f32], bias: &[f32], out: &mut [f32]) {
    add_bias(pre, bias, bias.len());
    for (o, &p) in out.iter_mut().zip(pre.iter()) {
        *o = gelu(p as f64) as f32;
    }
}

/// `dpre = dout * gelu'(pre)`, `dbias += sum over rows of dpre` (summed in f64 before rounding).
pub fn bias_gelu_backward(pre: &[f32], dout: &[f32], dpre: &mut [f32], dbias: &mut [f32]) {
    let cols = dbias.len();
    let mut sums = vec![0.0f64; cols];
    for (i, (&p, &d)) in pre.iter().zip(dout).enumerate() {
        let g = d as f64 * gelu_grad(p as f64);
        dpre[i] = g as f32;
        sums[i % cols] += g;
    }
    for (d, s) in dbias.iter_mut().zip(sums) {
        *d = (*d as f64 + s) as f32;
    }
}

/// Attention dropout factor of probability (b, h, i, j): counter `((b*H + h)*Tq + i)*Tk + j`
/// of `s.seed` keeps it (times `1/(1-p)`) iff its uniform draw is at least `p`.
pub fn attention_keep(s: &AttentionShape, b: usize, h: usize, i: usize, j: usize) -> f64 {
    if s.dropout <= 0.0 {
        return 1.0;
    }
    let idx = (((b * s.heads + h) * s.tq + i) * s.tk + j) as u64;
    if rng::uniform(s.seed, idx) >= s.dropout { 1.0 / (1.0 - s.dropout as f64) } else { 0.0 }
}

/// Index of element `t` of head `h` of token `pos` of batch item `b` in a `[B, T, H*D]` tensor
/// laid out like q (`Tq` tokens `q_stride` apart), like k and v (`Tk`, `kv_stride`), or like out
/// (`Tq`, contiguous).
#[derive(Clone, Copy)]
enum Layout {
    Q,
    Kv,
    Out,
}

fn head_at(s: &AttentionShape, layout: Layout, b: usize, pos: usize, h: usize, t: usize) -> usize {
    let (t_len, stride) = match layout {
        Layout::Q => (s.tq, s.q_stride),
        Layout::Kv => (s.tk, s.kv_stride),
        Layout::Out => (s.tq, s.width()),
    };
    (b * t_len + pos) * stride + h * s.head_dim + t
}

/// Softmax probabilities of one query row over the keys it may see (padding and, when causal,
/// later keys hidden); a row that may see no key is uniform over all keys, as an additive
/// "minus infinity" mask makes it.
fn attention_row(s: &AttentionShape, q: &[f32], k: &[f32], key_mask: &[f32], b: usize, h: usize, i: usize) -> Vec<f64> {
    let visible = |j: usize| key_mask[b * s.tk + j] != 0.0 && !(s.causal && j > i);
    if !(0..s.tk).any(visible) {
        return vec![1.0 / s.tk as f64; s.tk];
    }
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let scores: Vec<f64> = (0..s.tk)
        .map(|j| {
            let dot: f64 = (0..s.head_dim)
                .map(|t| q[head_at(s, Layout::Q, b, i, h, t)] as f64 * k[head_at(s, Layout::Kv, b, j, h, t)] as f64)
                .sum();
            if visible(j) { dot * scale } else { f64::NEG_INFINITY }
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|&x| (x - max).exp()).collect();
    let z: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / z).collect()
}

/// `P = softmax(q k^T / sqrt(D) + mask)` (saved in `probs`, `[B, H, Tq, Tk]`), then
/// `out = dropout(P) v`.
pub fn attention_forward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[f32],
    probs: &mut [f32],
    out: &mut [f32],
) {
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.tq {
                let p = attention_row(&s, q, k, key_mask, b, h, i);
                let row = ((b * s.heads + h) * s.tq + i) * s.tk;
                for (j, &pj) in p.iter().enumerate() {
                    probs[row + j] = pj as f32;
                }
                for t in 0..s.head_dim {
                    let acc: f64 = (0..s.tk)
                        .map(|j| p[j] * attention_keep(&s, b, h, i, j) * v[head_at(&s, Layout::Kv, b, j, h, t)] as f64)
                        .sum();
                    out[head_at(&s, Layout::Out, b, i, h, t)] = acc as f32;
                }
            }
        }
    }
}

/// Backward of [`attention_forward`] from the saved `probs`: `dv += Pd^T dout`,
/// `dP = keep * (dout v^T)`, `dS = P * (dP - rowsum(dP * P))`, `dq = dS k / sqrt(D)`
/// (assigned), `dk = dS^T q / sqrt(D)` and `dv = (P keep)^T dout` (assigned). Sums in f64, each
/// output rounded once.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: AttentionShape,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let (mut dk64, mut dv64) = (vec![0.0f64; dk.len()], vec![0.0f64; dv.len()]);
    let dot = |x: &[f32], lx: Layout, px: usize, y: &[f32], ly: Layout, py: usize, b: usize, h: usize| -> f64 {
        (0..s.head_dim).map(|t| x[head_at(&s, lx, b, px, h, t)] as f64 * y[head_at(&s, ly, b, py, h, t)] as f64).sum()
    };
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.tq {
                let row = ((b * s.heads + h) * s.tq + i) * s.tk;
                let p: Vec<f64> = probs[row..row + s.tk].iter().map(|&x| x as f64).collect();
                let keep: Vec<f64> = (0..s.tk).map(|j| attention_keep(&s, b, h, i, j)).collect();
                let dp: Vec<f64> =
                    (0..s.tk).map(|j| keep[j] * dot(dout, Layout::Out, i, v, Layout::Kv, j, b, h)).collect();
                let rowsum: f64 = dp.iter().zip(&p).map(|(a, b)| a * b).sum();
                let ds: Vec<f64> = (0..s.tk).map(|j| p[j] * (dp[j] - rowsum)).collect();
                for t in 0..s.head_dim {
                    let g: f64 = (0..s.tk).map(|j| ds[j] * k[head_at(&s, Layout::Kv, b, j, h, t)] as f64).sum();
                    dq[head_at(&s, Layout::Q, b, i, h, t)] = (g * scale) as f32;
                    let qv = q[head_at(&s, Layout::Q, b, i, h, t)] as f64;
                    let dov = dout[head_at(&s, Layout::Out, b, i, h, t)] as f64;
                    for j in 0..s.tk {
                        dk64[head_at(&s, Layout::Kv, b, j, h, t)] += ds[j] * qv * scale;
                        dv64[head_at(&s, Layout::Kv, b, j, h, t)] += p[j] * keep[j] * dov;
                    }
                }
            }
        }
    }
    // Only the elements of the heads change: a strided view's other columns keep their values.
    for b in 0..s.batch {
        for j in 0..s.tk {
            for h in 0..s.heads {
                for t in 0..s.head_dim {
                    let at = head_at(&s, Layout::Kv, b, j, h, t);
                    dk[at] = dk64[at] as f32;
                    dv[at] = dv64[at] as f32;
                }
            }
        }
    }
}

/// Per-row loss `(1-ls) * (lse - x_y) + ls * (lse - mean_v x_v)` (0 for ignored rows) and,
/// when `dlogits` is given, `grad_scale * (softmax - (1-ls) onehot(y) - ls / V)` (0 for ignored
/// rows).
pub fn cross_entropy(
    logits: &[f32],
    labels: &[i32],
    vocab: usize,
    label_smoothing: f32,
    grad_scale: f32,
    losses: &mut [f32],
    mut dlogits: Option<&mut [f32]>,
) {
    let ls = label_smoothing as f64;
    for (r, &y) in labels.iter().enumerate() {
        let x: Vec<f64> = logits[r * vocab..][..vocab].iter().map(|&v| v as f64).collect();
        if y == IGNORE_INDEX {
            losses[r] = 0.0;
            if let Some(d) = dlogits.as_deref_mut() {
                d[r * vocab..][..vocab].fill(0.0);
            }
            continue;
        }
        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let mean = x.iter().sum::<f64>() / vocab as f64;
        losses[r] = ((1.0 - ls) * (lse - x[y as usize]) + ls * (lse - mean)) as f32;
        if let Some(d) = dlogits.as_deref_mut() {
            for (v, o) in d[r * vocab..][..vocab].iter_mut().enumerate() {
                let target = if v == y as usize { 1.0 - ls } else { 0.0 } + ls / vocab as f64;
                *o = (grad_scale as f64 * ((x[v] - lse).exp() - target)) as f32;
            }
        }
    }
}

/// Inverted dropout: element `i` kept (times `1/(1-p)`) iff `rng::uniform(seed, i) >= p`.
/// Forward and backward are the same map.
pub fn dropout(x: &mut [f32], p: f32, seed: u64) {
    if p <= 0.0 {
        return;
    }
    for (i, v) in x.iter_mut().enumerate() {
        let keep = rng::uniform(seed, i as u64) >= p;
        *v = if keep { (*v as f64 / (1.0 - p as f64)) as f32 } else { 0.0 };
    }
}

/// `out = a + b`.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = (x as f64 + y as f64) as f32;
    }
}

/// `dst += src`.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = (*d as f64 + s as f64) as f32;
    }
}

/// `x *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v = (*v as f64 * s as f64) as f32;
    }
}

/// torch.optim.AdamW: `p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
/// `p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
pub fn adamw(h: AdamW, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
    let (lr, b1, b2, eps, wd) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64, h.eps as f64, h.weight_decay as f64);
    let (c1, c2) = (1.0 - b1.powi(h.step as i32), 1.0 - b2.powi(h.step as i32));
    for i in 0..params.len() {
        let g = grads[i] as f64;
        let mut p = params[i] as f64 * (1.0 - lr * wd);
        let mi = b1 * m[i] as f64 + (1.0 - b1) * g;
        let vi = b2 * v[i] as f64 + (1.0 - b2) * g * g;
        p -= lr * (mi / c1) / ((vi / c2).sqrt() + eps);
        (params[i], m[i], v[i]) = (p as f32, mi as f32, vi as f32);
    }
}

/// `sum(x^2)`.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum()
}

/// Gradient clipping as [`crate::clip_grad_norm`] specifies it: the global norm, and when it
/// exceeds `max_norm` every gradient scaled by `max_norm / (norm + 1e-6)`. Returns the norm.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f64 {
    let norm = sum_squares(grads).sqrt();
    let coef = max_norm as f64 / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (*g as f64 * coef) as f32;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_grad_is_the_derivative_of_gelu() {
        for x in [-3.0, -0.7, 0.0, 0.4, 2.5] {
            let fd = (gelu(x + 1e-6) - gelu(x - 1e-6)) / 2e-6;
            assert!((fd - gelu_grad(x)).abs() < 1e-8, "x = {x}");
        }
    }

    #[test]
    fn fully_masked_rows_are_uniform_and_others_sum_to_one() {
        let s = AttentionShape::new(1, 1, 2, 2, 3).with_causal(true);
        let (q, k, v) = ([0.5, -1.0, 2.0, 0.3], [1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (mut probs, mut out) = (vec![0.0; 6], vec![0.0; 4]);
        // Key 0 is padding: query 0 (causal) sees nothing, query 1 sees key 1 only.
        attention_forward(s, &q, &k, &v, &[0.0, 1.0, 1.0], &mut probs, &mut out);
        assert_eq!(&probs[..3], &[1.0 / 3.0; 3].map(|x: f64| x as f32));
        assert_eq!(&probs[3..], &[0.0, 1.0, 0.0]);
        assert_eq!(&out[2..], &[3.0, 4.0]);
    }
}
