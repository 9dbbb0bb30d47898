//! The LM head and the loss: `LN(gelu(h W_t^T + b_t)) E^T + bias` on the decoder rows whose
//! label counts (E the tied decoder word embeddings), then token cross-entropy, and their
//! backward. Padding rows cost nothing in the largest GEMMs (the projection to the vocabulary).
//!
//! The projection to the vocabulary never holds every label row's logits: `loss` takes the rows
//! in chunks of at most `chunk_rows`, and for each computes the chunk's logits, its token losses,
//! and (when training) the gradient over the same buffer, then at once that gradient's share of
//! d(LN output), dE and dbias. So the vocabulary part of the head's backward runs inside `loss`,
//! and `backward` continues from d(LN output).

use std::ops::Range;

use kernels::{Backend, GemmShape, KernelError, Operand};

use super::layers::{self, KResult, NormActs, Weights, r};
use crate::params::LmHeadView;

/// The head's activations, sized for every decoder row; a pass uses the first `m` (label rows).
pub(super) struct LmHead<B: Backend> {
    /// Hidden size and vocabulary size.
    width: usize,
    vocab: usize,
    /// Label rows projected to the vocabulary at once (at least 1).
    chunk_rows: usize,
    /// Label rows of the last `forward`: the rows whose LN output is current.
    rows_done: usize,
    /// The label rows of the decoder output.
    hidden: B::Buf,
    pre: B::Buf,
    act: B::Buf,
    norm: NormActs<B>,
    /// One chunk's logits `[chunk_rows, vocab]`; the loss overwrites them with their gradient.
    logits: B::Buf,
    /// d(loss)/d(LN output) of the label rows, from `loss` for `backward`.
    dnorm: B::Buf,
    losses: B::Buf,
}

/// The row ranges of `m` rows taken `chunk` at a time (the last one shorter).
fn chunks(m: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    (0..m).step_by(chunk).map(move |start| start..(start + chunk).min(m))
}

impl<B: Backend> LmHead<B> {
    /// Buffers for up to `rows` label rows, projected `chunk_rows` at a time (`None`: all).
    pub(super) fn new(b: &B, rows: usize, width: usize, vocab: usize, chunk_rows: Option<usize>) -> KResult<Self> {
        let c = width;
        let chunk_rows = chunk_rows.unwrap_or(rows).clamp(1, rows.max(1));
        Ok(Self {
            width,
            vocab,
            chunk_rows,
            rows_done: 0,
            hidden: b.activations(rows * c)?,
            pre: b.activations(rows * c)?,
            act: b.activations(rows * c)?,
            norm: NormActs::new(b, rows, c)?,
            logits: b.activations(chunk_rows * vocab)?,
            dnorm: b.activations(rows * c)?,
            losses: b.zeros(rows)?,
        })
    }

    /// The LN output of the `m` decoder rows `label_rows` of `dec_out` (what `loss` projects).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        hv: &LmHeadView,
        dec_out: &B::Buf,
        label_rows: &B::Ids,
        m: usize,
        eps: f32,
    ) -> KResult<()> {
        let (c, mc) = (self.width, m * self.width);
        b.embedding_forward(label_rows, r(b, dec_out), c, b.view_mut(&mut self.hidden, 0..mc), false)?;
        layers::linear_into(b, p, &hv.transform, b.view(&self.hidden, 0..mc), m, b.view_mut(&mut self.pre, 0..mc))?;
        b.gelu_forward(b.view(&self.pre, 0..mc), b.view_mut(&mut self.act, 0..mc))?;
        let n = &mut self.norm;
        b.layernorm_forward(
            b.view(&self.act, 0..mc),
            p.master(b, hv.norm.gamma.clone()),
            p.master(b, hv.norm.beta.clone()),
            eps,
            b.view_mut(&mut n.out, 0..mc),
            b.view_mut(&mut n.mean, 0..m),
            b.view_mut(&mut n.rstd, 0..m),
        )?;
        self.rows_done = m;
        Ok(())
    }

    /// `out[..rows] = LN output[rows] @ E^T + bias`, the logits of label rows `rows`.
    #[allow(clippy::too_many_arguments)]
    fn project(
        b: &B,
        p: &Weights<'_, B>,
        hv: &LmHeadView,
        word: Range<usize>,
        norm_out: &B::Buf,
        rows: Range<usize>,
        (c, v): (usize, usize),
        out: &mut B::Buf,
    ) -> KResult<()> {
        let n = rows.len();
        b.gemm_bias(
            GemmShape::plain(n, v, c),
            b.view(norm_out, rows.start * c..rows.end * c),
            Operand::n(c),
            p.gemm(b, word),
            Operand::t(c),
            p.master(b, hv.bias.clone()),
            b.view_mut(out, 0..n * v),
        )
    }

    /// Token losses of the `m` rows against `labels`, a chunk of rows at a time. With
    /// `grad = (scale, g)`, each chunk's d(loss)/d(logits), scaled by `scale`, also goes on at
    /// once: the vocabulary bias and E gradients ACCUMULATE into `g`, d(LN output) is kept for
    /// `backward`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn loss(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        hv: &LmHeadView,
        word: Range<usize>,
        labels: &B::Ids,
        m: usize,
        label_smoothing: f32,
        mut grad: Option<(f32, &mut B::Buf)>,
    ) -> KResult<()> {
        let (c, v) = (self.width, self.vocab);
        for rows in chunks(m, self.chunk_rows) {
            let nv = rows.len() * v;
            Self::project(b, p, hv, word.clone(), &self.norm.out, rows.clone(), (c, v), &mut self.logits)?;
            b.cross_entropy(
                b.view_mut(&mut self.logits, 0..nv),
                labels,
                rows.start,
                v,
                label_smoothing,
                grad.as_ref().map(|(scale, _)| *scale),
                b.view_mut(&mut self.losses, rows.clone()),
            )?;
            if let Some((_, g)) = grad.as_mut() {
                self.vocab_backward(b, p, g, hv, word.clone(), rows)?;
            }
        }
        Ok(())
    }

    /// From the gradient over the logits of label rows `rows` (in the logits buffer):
    /// `dbias += column sums`, `dE += dlogits^T @ LN output[rows]`, `d(LN output)[rows] = dlogits @ E`.
    fn vocab_backward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        hv: &LmHeadView,
        word: Range<usize>,
        rows: Range<usize>,
    ) -> KResult<()> {
        let (c, v, n) = (self.width, self.vocab, rows.len());
        let rc = rows.start * c..rows.end * c;
        let dl = b.view(&self.logits, 0..n * v);
        b.bias_grad(dl, b.view_mut(g, hv.bias.clone()), v)?;
        b.gemm(
            GemmShape::plain(v, c, n),
            1.0,
            dl,
            Operand::t(v),
            b.view(&self.norm.out, rc.clone()),
            Operand::n(c),
            1.0,
            b.view_mut(g, word.clone()),
        )?;
        b.gemm(
            GemmShape::plain(n, c, v),
            1.0,
            dl,
            Operand::n(v),
            p.gemm(b, word),
            Operand::n(c),
            0.0,
            b.view_mut(&mut self.dnorm, rc),
        )
    }

    /// The `m` token losses of the last `loss`, in label order.
    pub(super) fn token_losses(&self, b: &B, m: usize) -> KResult<Vec<f32>> {
        b.download(b.view(&self.losses, 0..m))
    }

    /// Logits `[m, vocab]` of the last `forward`'s first `m` label rows, recomputed a chunk at a
    /// time from its LN output and the parameters `p` (the pass kept no logits).
    pub(super) fn logits(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        hv: &LmHeadView,
        word: Range<usize>,
        m: usize,
    ) -> KResult<Vec<f32>> {
        if m > self.rows_done {
            let what = format!("{m} rows asked, the last pass had {}", self.rows_done);
            return Err(KernelError::Shape { op: "lm_head_logits", what });
        }
        let (c, v) = (self.width, self.vocab);
        let mut chunk = b.zeros(self.chunk_rows.min(m.max(1)) * v)?;
        let mut out = Vec::with_capacity(m * v);
        for rows in chunks(m, self.chunk_rows) {
            let n = rows.len();
            Self::project(b, p, hv, word.clone(), &self.norm.out, rows, (c, v), &mut chunk)?;
            out.extend(b.download(b.view(&chunk, 0..n * v))?);
        }
        Ok(out)
    }

    /// The rest of backward, from the d(LN output) that `loss` left: parameter gradients
    /// accumulate into `g`; the gradient of all `rows` decoder output rows is ASSIGNED to `d[0]`
    /// (0 on rows without a label); `d[1]` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        hv: &LmHeadView,
        label_rows: &B::Ids,
        (m, rows): (usize, usize),
        d: &mut [B::Buf; 2],
    ) -> KResult<()> {
        let (c, mc) = (self.width, m * self.width);
        let [d_a, d_b] = d;
        let (dg, db) = b.view_mut2(g, hv.norm.gamma.clone(), hv.norm.beta.clone());
        b.layernorm_backward(
            b.view(&self.dnorm, 0..mc),
            b.view(&self.act, 0..mc),
            p.master(b, hv.norm.gamma.clone()),
            b.view(&self.norm.mean, 0..m),
            b.view(&self.norm.rstd, 0..m),
            b.view_mut(d_b, 0..mc),
            false,
            dg,
            db,
        )?;
        b.gelu_backward(b.view(&self.pre, 0..mc), b.view(d_b, 0..mc), b.view_mut(d_a, 0..mc))?;
        let (x, dy) = (b.view(&self.hidden, 0..mc), b.view(d_a, 0..mc));
        layers::linear_backward(b, p, g, &hv.transform, x, dy, m, true, Some((b.view_mut(d_b, 0..mc), false)))?;
        // Scatter the label rows' gradient back to all decoder rows (padding rows get 0).
        b.fill(b.view_mut(d_a, 0..rows * c), 0.0)?;
        b.embedding_backward(label_rows, b.view(d_b, 0..mc), c, b.view_mut(d_a, 0..rows * c))
    }
}
