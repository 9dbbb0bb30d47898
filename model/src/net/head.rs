//! The LM head and the loss: `LN(gelu(h W_t^T + b_t)) E^T + bias` on the decoder rows whose
//! label counts (E the tied decoder word embeddings), then token cross-entropy, and their
//! backward. Padding rows cost nothing in the largest GEMMs (the projection to the vocabulary).

use std::ops::Range;

use kernels::{Backend, GemmShape, Operand};

use super::layers::{self, KResult, NormActs, matmul_wt, r};
use crate::params::LmHeadView;

/// The head's activations, sized for every decoder row; a pass uses the first `m` (label rows).
pub(super) struct LmHead<B: Backend> {
    /// Hidden size and vocabulary size.
    width: usize,
    vocab: usize,
    /// The label rows of the decoder output.
    hidden: B::Buf,
    pre: B::Buf,
    act: B::Buf,
    norm: NormActs<B>,
    logits: B::Buf,
    dlogits: B::Buf,
    losses: B::Buf,
}

impl<B: Backend> LmHead<B> {
    pub(super) fn new(b: &B, rows: usize, width: usize, vocab: usize) -> KResult<Self> {
        let c = width;
        Ok(Self {
            width,
            vocab,
            hidden: b.zeros(rows * c)?,
            pre: b.zeros(rows * c)?,
            act: b.zeros(rows * c)?,
            norm: NormActs::new(b, rows, c)?,
            logits: b.zeros(rows * vocab)?,
            dlogits: b.zeros(rows * vocab)?,
            losses: b.zeros(rows)?,
        })
    }

    /// Logits `[m, vocab]` of the last pass's `m` label rows (the buffer holds more).
    pub(super) fn logits(&self) -> &B::Buf {
        &self.logits
    }

    /// Logits of the `m` decoder rows `label_rows` of `dec_out`; `word` is E's range in `p`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        b: &B,
        p: &B::Buf,
        hv: &LmHeadView,
        word: Range<usize>,
        dec_out: &B::Buf,
        label_rows: &B::Ids,
        m: usize,
        eps: f32,
    ) -> KResult<()> {
        let (c, v) = (self.width, self.vocab);
        let (mc, mv) = (m * c, m * v);
        b.embedding_forward(label_rows, r(b, dec_out), c, b.view_mut(&mut self.hidden, 0..mc), false)?;
        matmul_wt(b, p, &hv.transform, b.view(&self.hidden, 0..mc), m, b.view_mut(&mut self.pre, 0..mc))?;
        b.bias_gelu_forward(
            b.view_mut(&mut self.pre, 0..mc),
            b.view(p, hv.transform.b.clone()),
            b.view_mut(&mut self.act, 0..mc),
        )?;
        let n = &mut self.norm;
        b.layernorm_forward(
            b.view(&self.act, 0..mc),
            b.view(p, hv.norm.gamma.clone()),
            b.view(p, hv.norm.beta.clone()),
            eps,
            b.view_mut(&mut n.out, 0..mc),
            b.view_mut(&mut n.mean, 0..m),
            b.view_mut(&mut n.rstd, 0..m),
        )?;
        b.gemm(
            GemmShape::plain(m, v, c),
            1.0,
            b.view(&self.norm.out, 0..mc),
            Operand::n(c),
            b.view(p, word),
            Operand::t(c),
            0.0,
            b.view_mut(&mut self.logits, 0..mv),
        )?;
        b.add_bias(b.view_mut(&mut self.logits, 0..mv), b.view(p, hv.bias.clone()), v)
    }

    /// Token losses of the `m` rows against `labels`; with `grad_scale`, also d(loss)/d(logits)
    /// for `backward`, scaled by it.
    pub(super) fn loss(
        &mut self,
        b: &B,
        labels: &B::Ids,
        m: usize,
        label_smoothing: f32,
        grad_scale: Option<f32>,
    ) -> KResult<()> {
        let mv = m * self.vocab;
        let dlogits = grad_scale.map(|_| b.view_mut(&mut self.dlogits, 0..mv));
        b.cross_entropy(
            b.view(&self.logits, 0..mv),
            labels,
            self.vocab,
            label_smoothing,
            grad_scale.unwrap_or(0.0),
            b.view_mut(&mut self.losses, 0..m),
            dlogits,
        )
    }

    /// The `m` token losses of the last `loss`, in label order.
    pub(super) fn token_losses(&self, b: &B, m: usize) -> KResult<Vec<f32>> {
        b.download(b.view(&self.losses, 0..m))
    }

    /// Backward from the gradient `loss` left: parameter gradients accumulate into `g`; the
    /// gradient of all `rows` decoder output rows is ASSIGNED to `d[0]` (0 on rows without a
    /// label); `d[1]` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        b: &B,
        p: &B::Buf,
        g: &mut B::Buf,
        hv: &LmHeadView,
        word: Range<usize>,
        label_rows: &B::Ids,
        (m, rows): (usize, usize),
        d: &mut [B::Buf; 2],
    ) -> KResult<()> {
        let (c, v) = (self.width, self.vocab);
        let (mc, mv) = (m * c, m * v);
        let dl = b.view(&self.dlogits, 0..mv);
        b.bias_grad(dl, b.view_mut(g, hv.bias.clone()), v)?;
        b.gemm(
            GemmShape::plain(v, c, m),
            1.0,
            dl,
            Operand::t(v),
            b.view(&self.norm.out, 0..mc),
            Operand::n(c),
            1.0,
            b.view_mut(g, word.clone()),
        )?;
        // The LN output's gradient cannot go to `pre` (GELU backward still reads it), so it goes
        // to the decoder's gradient buffers, free until decoder backward.
        let [d_a, d_b] = d;
        b.gemm(
            GemmShape::plain(m, c, v),
            1.0,
            dl,
            Operand::n(v),
            b.view(p, word),
            Operand::n(c),
            0.0,
            b.view_mut(d_a, 0..mc),
        )?;
        let (dg, db) = b.view_mut2(g, hv.norm.gamma.clone(), hv.norm.beta.clone());
        b.layernorm_backward(
            b.view(d_a, 0..mc),
            b.view(&self.act, 0..mc),
            b.view(p, hv.norm.gamma.clone()),
            b.view(&self.norm.mean, 0..m),
            b.view(&self.norm.rstd, 0..m),
            b.view_mut(d_b, 0..mc),
            false,
            dg,
            db,
        )?;
        b.bias_gelu_backward(
            b.view(&self.pre, 0..mc),
            b.view(d_b, 0..mc),
            b.view_mut(d_a, 0..mc),
            b.view_mut(g, hv.transform.b.clone()),
        )?;
        let (x, dy) = (b.view(&self.hidden, 0..mc), b.view(d_a, 0..mc));
        layers::linear_backward(b, p, g, &hv.transform, x, dy, m, false, Some((b.view_mut(d_b, 0..mc), false)))?;
        // Scatter the label rows' gradient back to all decoder rows (padding rows get 0).
        b.fill(b.view_mut(d_a, 0..rows * c), 0.0)?;
        b.embedding_backward(label_rows, b.view(d_b, 0..mc), c, b.view_mut(d_a, 0..rows * c))
    }
}
