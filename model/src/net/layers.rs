//! The building blocks of BERT2BERT, forward and backward side by side: Linear, the
//! attention block (self or cross) with its residual LayerNorm, the feed-forward block and the
//! embeddings. Each block owns the activations its backward needs.
//!
//! Accumulation contract (as in `kernels`): parameter gradients `+=`; a block's input gradient
//! is assigned unless the function says it accumulates.

use kernels::{AttentionShape, Backend, GemmShape, Operand};

use crate::params::{AttentionView, EmbeddingsView, LayerView, LinearView, NormView};

pub(crate) type KResult<T> = kernels::Result<T>;

/// The parameters a pass reads: the fp32 master buffer, for everything but GEMM operands
/// (biases, LayerNorm, embedding tables), and the copy the GEMMs multiply, stored at the
/// backend's activation dtype (bf16 in mixed precision; the master itself on an fp32 backend).
/// Both have the layout of `ParamTable`.
pub(crate) struct Weights<'a, B: Backend> {
    pub master: &'a B::Buf,
    pub gemm: &'a B::Buf,
    /// Which weight gradients this step has not written yet (see [`FreshGrads`]).
    pub fresh: &'a FreshGrads,
}

/// The weight gradients that `zero_grads` zeroed and no pass has written since, by the start of
/// their range. The first write of one may ASSIGN what would otherwise accumulate onto zeros:
/// the same values, without reading the zeros back, and with the bias gradient written by the
/// GEMM's epilogue (`gemm_bias_grad`). Until the first `zero_grads` nothing is fresh (every write
/// accumulates, as before), so gradients a caller put in `grads` itself are never overwritten.
#[derive(Default)]
pub(crate) struct FreshGrads {
    /// `None`: not armed. `Some(written)`: armed by `zero_grads`; `written` holds the ranges a
    /// pass has written since.
    written: std::sync::Mutex<Option<std::collections::HashSet<usize>>>,
}

impl FreshGrads {
    /// Every gradient is zero and unwritten (called with the zeroing).
    pub fn arm(&self) {
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(Default::default());
    }
    /// Whether the gradient range starting at `start` is written for the first time since
    /// `arm`, marking it written.
    pub fn first_write(&self, start: usize) -> bool {
        let mut guard = self.written.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().is_some_and(|written| written.insert(start))
    }
}

impl<'a, B: Backend> Weights<'a, B> {
    /// A view of the master (fp32) parameters.
    pub fn master(&self, b: &B, range: std::ops::Range<usize>) -> B::Ref<'a> {
        b.view(self.master, range)
    }
    /// A view of the GEMM copy: a weight matrix as a GEMM operand.
    pub fn gemm(&self, b: &B, range: std::ops::Range<usize>) -> B::Ref<'a> {
        b.view(self.gemm, range)
    }
}

/// Whole-buffer views.
pub(crate) fn r<'a, B: Backend>(b: &B, x: &'a B::Buf) -> B::Ref<'a> {
    b.view(x, 0..b.len(x))
}
pub(crate) fn w<'a, B: Backend>(b: &B, x: &'a mut B::Buf) -> B::Mut<'a> {
    let n = b.len(x);
    b.view_mut(x, 0..n)
}

/// `y = x W^T + bias`, the bias fused into the GEMM where the backend can.
pub(crate) fn linear_forward<B: Backend>(
    b: &B,
    p: &Weights<'_, B>,
    lin: &LinearView,
    x: B::Ref<'_>,
    rows: usize,
    y: &mut B::Buf,
) -> KResult<()> {
    linear_into(b, p, lin, x, rows, w(b, y))
}

/// `y = x W^T + bias` into a view.
pub(crate) fn linear_into<B: Backend>(
    b: &B,
    p: &Weights<'_, B>,
    lin: &LinearView,
    x: B::Ref<'_>,
    rows: usize,
    y: B::Mut<'_>,
) -> KResult<()> {
    let s = GemmShape::plain(rows, lin.out_dim, lin.in_dim);
    let weight = p.gemm(b, lin.w.clone());
    b.gemm_bias(s, x, Operand::n(lin.in_dim), weight, Operand::t(lin.in_dim), p.master(b, lin.b.clone()), y)
}

/// `dW += dy^T x`; optionally `dbias += colsum(dy)`; `dx (= or +=) dy W` when `dx` is given.
/// On the weight's first write of a step (`Weights::fresh`) the two gradients are assigned in
/// one fused call instead. `dy` holds exactly `rows` rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward<B: Backend>(
    b: &B,
    p: &Weights<'_, B>,
    g: &mut B::Buf,
    lin: &LinearView,
    x: B::Ref<'_>,
    dy: B::Ref<'_>,
    rows: usize,
    with_bias: bool,
    dx: Option<(B::Mut<'_>, bool)>,
) -> KResult<()> {
    let (o, i) = (lin.out_dim, lin.in_dim);
    let s = GemmShape::plain(o, i, rows);
    match (p.fresh.first_write(lin.w.start), with_bias) {
        (true, true) => {
            let (dw, db) = b.view_mut2(g, lin.w.clone(), lin.b.clone());
            b.gemm_bias_grad(s, dy, Operand::t(o), x, Operand::n(i), dw, db)?;
        }
        (true, false) => b.gemm(s, 1.0, dy, Operand::t(o), x, Operand::n(i), 0.0, b.view_mut(g, lin.w.clone()))?,
        (false, _) => {
            b.gemm(s, 1.0, dy, Operand::t(o), x, Operand::n(i), 1.0, b.view_mut(g, lin.w.clone()))?;
            if with_bias {
                b.bias_grad(dy, b.view_mut(g, lin.b.clone()), o)?;
            }
        }
    }
    if let Some((dx, accumulate)) = dx {
        let beta = if accumulate { 1.0 } else { 0.0 };
        b.gemm(
            GemmShape::plain(rows, i, o),
            1.0,
            dy,
            Operand::n(o),
            p.gemm(b, lin.w.clone()),
            Operand::n(i),
            beta,
            dx,
        )?;
    }
    Ok(())
}

/// Saved state of one residual LayerNorm: its input (the residual sum), mean, 1/std, output.
pub(crate) struct NormActs<B: Backend> {
    pub input: B::Buf,
    pub mean: B::Buf,
    pub rstd: B::Buf,
    pub out: B::Buf,
}

impl<B: Backend> NormActs<B> {
    pub fn new(b: &B, rows: usize, c: usize) -> KResult<Self> {
        Ok(Self {
            input: b.activations(rows * c)?,
            mean: b.zeros(rows)?,
            rstd: b.zeros(rows)?,
            out: b.activations(rows * c)?,
        })
    }
    /// `out = LN(input)`.
    pub fn forward(&mut self, b: &B, p: &Weights<'_, B>, n: &NormView, eps: f32) -> KResult<()> {
        b.layernorm_forward(
            r(b, &self.input),
            p.master(b, n.gamma.clone()),
            p.master(b, n.beta.clone()),
            eps,
            w(b, &mut self.out),
            w(b, &mut self.mean),
            w(b, &mut self.rstd),
        )
    }
    /// `d_input (= or +=) LN'(d_out)`, gamma/beta gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        n: &NormView,
        d_out: B::Ref<'_>,
        d_input: B::Mut<'_>,
        accumulate: bool,
    ) -> KResult<()> {
        let (dg, db) = b.view_mut2(g, n.gamma.clone(), n.beta.clone());
        b.layernorm_backward(
            d_out,
            r(b, &self.input),
            p.master(b, n.gamma.clone()),
            r(b, &self.mean),
            r(b, &self.rstd),
            d_input,
            accumulate,
            dg,
            db,
        )
    }

    /// `out = LN(dropout(input) + skip)`, where `input` holds the block's output on entry and
    /// the residual sum (the LayerNorm input) on return: one fused op.
    pub fn residual_forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        n: &NormView,
        skip: B::Ref<'_>,
        dropout: (f32, u64),
        eps: f32,
    ) -> KResult<()> {
        b.residual_norm_forward(
            w(b, &mut self.input),
            skip,
            p.master(b, n.gamma.clone()),
            p.master(b, n.beta.clone()),
            eps,
            dropout.0,
            dropout.1,
            w(b, &mut self.out),
            w(b, &mut self.mean),
            w(b, &mut self.rstd),
        )
    }

    /// Backward of `residual_forward`: ASSIGNS `d_skip`, and leaves the gradient of the block's
    /// output (before dropout) in `d_res[..len]`; gamma/beta gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        n: &NormView,
        d_out: B::Ref<'_>,
        d_res: &mut B::Buf,
        len: usize,
        d_skip: &mut B::Buf,
        dropout: (f32, u64),
    ) -> KResult<()> {
        let (dg, db) = b.view_mut2(g, n.gamma.clone(), n.beta.clone());
        b.residual_norm_backward(
            d_out,
            r(b, &self.input),
            p.master(b, n.gamma.clone()),
            r(b, &self.mean),
            r(b, &self.rstd),
            dropout.0,
            dropout.1,
            w(b, d_skip),
            false,
            b.view_mut(d_res, 0..len),
            dg,
            db,
        )
    }
}

/// Dropout rates and the seeds of one block's dropout sites.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dropout {
    pub hidden: f32,
    pub attention: f32,
    pub seed: u64,
}

impl Dropout {
    pub fn off() -> Self {
        Dropout { hidden: 0.0, attention: 0.0, seed: 0 }
    }
    pub fn site(&self, k: u64) -> u64 {
        kernels::rng::derive(self.seed, k)
    }
}

/// An attention block: `LN(x_q + dropout(Dense(Attention(Q(x_q), K(x_kv), V(x_kv)))))`.
pub(crate) struct AttnActs<B: Backend> {
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    /// What the backend's attention saves for backward (`attention_saved_len`).
    pub saved: B::Buf,
    pub ctx: B::Buf,
    pub norm: NormActs<B>,
}

/// Gradient scratch shared by all blocks of a stack (sized for the largest use).
pub(crate) struct Scratch<B: Backend> {
    pub d_res: B::Buf,
    pub d_ctx: B::Buf,
    pub dq: B::Buf,
    pub dk: B::Buf,
    pub dv: B::Buf,
    pub d_inter: B::Buf,
    pub d_inter_pre: B::Buf,
}

impl<B: Backend> Scratch<B> {
    pub fn new(b: &B, rows_q: usize, rows_kv: usize, c: usize, inter: usize) -> KResult<Self> {
        Ok(Self {
            d_res: b.activations(rows_q * c)?,
            d_ctx: b.activations(rows_q * c)?,
            dq: b.activations(rows_q * c)?,
            dk: b.activations(rows_kv * c)?,
            dv: b.activations(rows_kv * c)?,
            d_inter: b.activations(rows_q * inter)?,
            d_inter_pre: b.activations(rows_q * inter)?,
        })
    }
}

impl<B: Backend> AttnActs<B> {
    pub fn new(b: &B, s: &AttentionShape) -> KResult<Self> {
        let c = s.heads * s.head_dim;
        let (rq, rk) = (s.batch * s.tq, s.batch * s.tk);
        Ok(Self {
            q: b.activations(rq * c)?,
            k: b.activations(rk * c)?,
            v: b.activations(rk * c)?,
            saved: b.zeros(b.attention_saved_len(s))?,
            ctx: b.activations(rq * c)?,
            norm: NormActs::new(b, rq, c)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        av: &AttentionView,
        s: AttentionShape,
        x_q: B::Ref<'_>,
        x_kv: B::Ref<'_>,
        key_mask: B::Ref<'_>,
        hidden_dropout: (f32, u64),
        eps: f32,
    ) -> KResult<()> {
        let (rq, rk) = (s.batch * s.tq, s.batch * s.tk);
        linear_forward(b, p, &av.q, x_q, rq, &mut self.q)?;
        linear_forward(b, p, &av.k, x_kv, rk, &mut self.k)?;
        linear_forward(b, p, &av.v, x_kv, rk, &mut self.v)?;
        b.attention_forward(
            s,
            r(b, &self.q),
            r(b, &self.k),
            r(b, &self.v),
            key_mask,
            w(b, &mut self.saved),
            w(b, &mut self.ctx),
        )?;
        linear_forward(b, p, &av.out, r(b, &self.ctx), rq, &mut self.norm.input)?;
        self.norm.residual_forward(b, p, &av.norm, x_q, hidden_dropout, eps)
    }

    /// Given `d_out` (gradient of the block output), ASSIGNS `d_xq` and ACCUMULATES the K/V
    /// input gradient into `d_xkv`, or into `d_xq` for self-attention (`d_xkv = None`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        av: &AttentionView,
        s: AttentionShape,
        x_q: B::Ref<'_>,
        x_kv: B::Ref<'_>,
        key_mask: B::Ref<'_>,
        hidden_dropout: (f32, u64),
        d_out: B::Ref<'_>,
        d_xq: &mut B::Buf,
        d_xkv: Option<&mut B::Buf>,
        sc: &mut Scratch<B>,
    ) -> KResult<()> {
        let (rq, rk) = (s.batch * s.tq, s.batch * s.tk);
        let c = s.heads * s.head_dim;
        self.norm.residual_backward(b, p, g, &av.norm, d_out, &mut sc.d_res, rq * c, d_xq, hidden_dropout)?;
        let d_ctx = b.view_mut(&mut sc.d_ctx, 0..rq * c);
        linear_backward(
            b,
            p,
            g,
            &av.out,
            r(b, &self.ctx),
            b.view(&sc.d_res, 0..rq * c),
            rq,
            true,
            Some((d_ctx, false)),
        )?;
        let (dq, dk, dv) =
            (b.view_mut(&mut sc.dq, 0..rq * c), b.view_mut(&mut sc.dk, 0..rk * c), b.view_mut(&mut sc.dv, 0..rk * c));
        b.attention_backward(
            s,
            b.view(&sc.d_ctx, 0..rq * c),
            r(b, &self.q),
            r(b, &self.k),
            r(b, &self.v),
            key_mask,
            r(b, &self.ctx),
            r(b, &self.saved),
            dq,
            dk,
            dv,
        )?;
        linear_backward(b, p, g, &av.q, x_q, b.view(&sc.dq, 0..rq * c), rq, true, Some((w(b, d_xq), true)))?;
        let d_kv_target = match d_xkv {
            Some(t) => t,
            None => d_xq,
        };
        linear_backward(b, p, g, &av.k, x_kv, b.view(&sc.dk, 0..rk * c), rk, true, Some((w(b, d_kv_target), true)))?;
        linear_backward(b, p, g, &av.v, x_kv, b.view(&sc.dv, 0..rk * c), rk, true, Some((w(b, d_kv_target), true)))
    }
}

/// The feed-forward block: `LN(h + dropout(Dense2(gelu(Dense1(h)))))`.
pub(crate) struct FfnActs<B: Backend> {
    pub inter_pre: B::Buf,
    pub inter_act: B::Buf,
    pub norm: NormActs<B>,
}

impl<B: Backend> FfnActs<B> {
    pub fn new(b: &B, rows: usize, c: usize, inter: usize) -> KResult<Self> {
        Ok(Self {
            inter_pre: b.activations(rows * inter)?,
            inter_act: b.activations(rows * inter)?,
            norm: NormActs::new(b, rows, c)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        lv: &LayerView,
        h: B::Ref<'_>,
        rows: usize,
        dropout: (f32, u64),
        eps: f32,
    ) -> KResult<()> {
        linear_forward(b, p, &lv.inter, h, rows, &mut self.inter_pre)?;
        b.gelu_forward(r(b, &self.inter_pre), w(b, &mut self.inter_act))?;
        linear_forward(b, p, &lv.output, r(b, &self.inter_act), rows, &mut self.norm.input)?;
        self.norm.residual_forward(b, p, &lv.norm, h, dropout, eps)
    }

    /// ASSIGNS `d_h` from `d_out`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        lv: &LayerView,
        h: B::Ref<'_>,
        rows: usize,
        dropout: (f32, u64),
        d_out: B::Ref<'_>,
        d_h: &mut B::Buf,
        sc: &mut Scratch<B>,
    ) -> KResult<()> {
        let c = lv.output.out_dim;
        let i = lv.inter.out_dim;
        self.norm.residual_backward(b, p, g, &lv.norm, d_out, &mut sc.d_res, rows * c, d_h, dropout)?;
        let d_inter = b.view_mut(&mut sc.d_inter, 0..rows * i);
        linear_backward(
            b,
            p,
            g,
            &lv.output,
            r(b, &self.inter_act),
            b.view(&sc.d_res, 0..rows * c),
            rows,
            true,
            Some((d_inter, false)),
        )?;
        b.gelu_backward(
            r(b, &self.inter_pre),
            b.view(&sc.d_inter, 0..rows * i),
            b.view_mut(&mut sc.d_inter_pre, 0..rows * i),
        )?;
        linear_backward(
            b,
            p,
            g,
            &lv.inter,
            h,
            b.view(&sc.d_inter_pre, 0..rows * i),
            rows,
            true,
            Some((w(b, d_h), true)),
        )
    }
}

/// Embeddings: `dropout(LN(word[ids] + position[offset + t] + token_type[0]))` (offset: see
/// `EmbeddingsView::position_rows`).
pub(crate) struct EmbActs<B: Backend> {
    pub norm: NormActs<B>,
}

/// Ids a stack's embeddings read: tokens, positions `0..T` per row, token types (all 0).
pub(crate) struct EmbIds<B: Backend> {
    pub tokens: B::Ids,
    pub positions: B::Ids,
    pub types: B::Ids,
}

impl<B: Backend> EmbIds<B> {
    pub fn new(b: &B, tokens: &[i32], batch: usize, len: usize) -> KResult<Self> {
        let positions: Vec<i32> = (0..batch * len).map(|i| (i % len) as i32).collect();
        Ok(Self {
            tokens: b.upload_ids(tokens)?,
            positions: b.upload_ids(&positions)?,
            types: b.upload_ids(&vec![0; batch * len])?,
        })
    }
}

impl<B: Backend> EmbActs<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        ev: &EmbeddingsView,
        ids: &EmbIds<B>,
        c: usize,
        dropout: (f32, u64),
        eps: f32,
    ) -> KResult<()> {
        b.embedding_forward(&ids.tokens, p.master(b, ev.word.clone()), c, w(b, &mut self.norm.input), false)?;
        b.embedding_forward(
            &ids.positions,
            p.master(b, ev.position_rows.clone()),
            c,
            w(b, &mut self.norm.input),
            true,
        )?;
        b.embedding_forward(&ids.types, p.master(b, ev.token_type.clone()), c, w(b, &mut self.norm.input), true)?;
        self.norm.forward(b, p, &ev.norm, eps)?;
        if dropout.0 > 0.0 {
            b.dropout_forward(w(b, &mut self.norm.out), dropout.0, dropout.1)?;
        }
        Ok(())
    }

    /// Consumes `d_out` (modified in place by the dropout backward).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        ev: &EmbeddingsView,
        ids: &EmbIds<B>,
        c: usize,
        dropout: (f32, u64),
        d_out: &mut B::Buf,
        d_sum: &mut B::Buf,
    ) -> KResult<()> {
        if dropout.0 > 0.0 {
            b.dropout_backward(w(b, d_out), dropout.0, dropout.1)?;
        }
        let n = b.len(d_out);
        self.norm.backward(b, p, g, &ev.norm, r(b, d_out), b.view_mut(d_sum, 0..n), false)?;
        let ds = b.view(d_sum, 0..n);
        b.embedding_backward(&ids.tokens, ds, c, b.view_mut(g, ev.word.clone()))?;
        b.embedding_backward(&ids.positions, ds, c, b.view_mut(g, ev.position_rows.clone()))?;
        b.embedding_backward(&ids.types, ds, c, b.view_mut(g, ev.token_type.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::FreshGrads;

    #[test]
    fn only_the_first_write_after_zeroing_is_fresh() {
        let fresh = FreshGrads::default();
        // Before any zero_grads, gradients may hold what the caller put there: nothing is fresh.
        assert!(!fresh.first_write(7));
        fresh.arm();
        assert!(fresh.first_write(7));
        assert!(fresh.first_write(11), "another range is fresh on its own");
        assert!(!fresh.first_write(7), "a second write (micro-batch, shared layer) accumulates");
        fresh.arm();
        assert!(fresh.first_write(7), "zeroing again makes it fresh again");
    }
}
