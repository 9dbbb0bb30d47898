//! BERT2BERT forward and hand-written backward on any `kernels::Backend`.
//!
//! Encoder: BERT (post-LN). Decoder: BERT with causal self-attention and a cross-attention block
//! after it in every layer. LM head: `LN(gelu(h W_t^T + b_t)) E^T + bias`, E the decoder word
//! embeddings (tied). Loss: token cross-entropy over the label positions.
//!
//! The LM head runs only on rows whose label is not ignored: padding rows cost nothing in the
//! largest GEMMs (the projection to the vocabulary) and the loss. It projects those rows to the
//! vocabulary a chunk at a time (`Memory::logits_chunk_floats`, or `set_lm_head_chunk_rows`)
//! and keeps no logits: the loss step also runs the vocabulary part of the head's backward.
//!
//! A pass is `Bert2Bert::{forward, loss, backward}` over three blocks, each owning its forward,
//! backward, dropout sites and workspace: `encoder::Encoder`, `decoder::Decoder` and
//! `head::LmHead`, built from the layers in `layers`. A fused or lower-precision block swaps in
//! at one place.

mod decoder;
mod encoder;
mod generate;
mod grad_ready;
mod head;
mod layers;
mod stack;

pub use generate::{GenerateOptions, Generated, LengthPenaltyKind};

use kernels::{Backend, IGNORE_INDEX};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::optim::Optimizer;
use crate::params::{ModelView, ParamTable};
use decoder::{Decoder, Encoded};
use encoder::Encoder;
// `generate` builds encoder layers of its own shape.
use encoder::EncoderLayer;
use grad_ready::{GradReady, stage_done};
use head::LmHead;
use layers::{EmbIds, FreshGrads, Weights, r, w};
use stack::StackPass;

/// One batch on the device, in transformers' EncoderDecoderModel convention.
pub struct Inputs<B: Backend> {
    pub batch: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    src: EmbIds<B>,
    dec: EmbIds<B>,
    src_mask: B::Buf,
    dec_mask: B::Buf,
    /// Indices (into `batch * tgt_len`) of the rows whose label counts, and those labels.
    label_rows: B::Ids,
    labels: B::Ids,
    row_example: Vec<usize>,
}

impl<B: Backend> Inputs<B> {
    /// `src_ids`/`src_mask` `[batch, src_len]`; `dec_ids`/`labels` `[batch, tgt_len]`,
    /// labels `IGNORE_INDEX` at padding.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &B,
        batch: usize,
        src_len: usize,
        tgt_len: usize,
        src_ids: &[i32],
        src_mask: &[f32],
        dec_ids: &[i32],
        labels: &[i32],
    ) -> Result<Self> {
        let ok = src_ids.len() == batch * src_len
            && src_mask.len() == src_ids.len()
            && dec_ids.len() == batch * tgt_len
            && labels.len() == dec_ids.len();
        if !ok || batch == 0 || src_len == 0 || tgt_len == 0 {
            return Err(Error::Other(format!(
                "inputs: inconsistent batch shapes (batch {batch}, src {src_len}, tgt {tgt_len})"
            )));
        }
        let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != IGNORE_INDEX).collect();
        let label_rows: Vec<i32> = rows.iter().map(|&i| i as i32).collect();
        let kept: Vec<i32> = rows.iter().map(|&i| labels[i]).collect();
        Ok(Self {
            batch,
            src_len,
            tgt_len,
            src: EmbIds::new(b, src_ids, batch, src_len)?,
            dec: EmbIds::new(b, dec_ids, batch, tgt_len)?,
            src_mask: b.upload(src_mask)?,
            dec_mask: b.upload(&vec![1.0; batch * tgt_len])?,
            label_rows: b.upload_ids(&label_rows)?,
            labels: b.upload_ids(&kept)?,
            row_example: rows.iter().map(|&i| i / tgt_len).collect(),
        })
    }

    /// A padded batch from `data::Batch`.
    pub fn from_batch(b: &B, batch: &crate::data::Batch) -> Result<Self> {
        Self::new(
            b,
            batch.batch,
            batch.src_len,
            batch.tgt_len,
            &batch.src_ids,
            &batch.src_mask,
            &batch.dec_ids,
            &batch.labels,
        )
    }

    /// Number of label tokens that the loss counts.
    pub fn label_tokens(&self) -> usize {
        self.row_example.len()
    }
}

/// What one forward (and optional backward) pass does.
#[derive(Clone, Copy, Debug)]
pub struct PassOptions {
    /// Dropout on (training) or off (evaluation).
    pub train: bool,
    /// Seed of this pass's dropout masks.
    pub seed: u64,
    pub label_smoothing: f32,
    /// Run backward with d(loss)/d(token loss) = `grad_scale` (e.g. 1 / label tokens of the
    /// whole optimiser step); `None` runs forward only.
    pub grad_scale: Option<f32>,
}

/// The hook of [`Bert2Bert::pass_with_final_grads`]: called with a range of the gradient buffer
/// that backward is done with, and the buffer.
pub type FinalGrads<'h, Buf> = dyn FnMut(std::ops::Range<usize>, &Buf) -> Result<()> + 'h;

/// Per-label-token losses of one pass.
#[derive(Clone, Debug)]
pub struct BatchLoss {
    pub token_loss: Vec<f32>,
    pub token_example: Vec<usize>,
    pub batch: usize,
}

impl BatchLoss {
    pub fn sum(&self) -> f64 {
        self.token_loss.iter().map(|&x| x as f64).sum()
    }
    pub fn tokens(&self) -> usize {
        self.token_loss.len()
    }
    /// Mean token loss of each example (NaN for an example without label tokens).
    pub fn per_example_mean(&self) -> Vec<f64> {
        let mut sum = vec![0.0f64; self.batch];
        let mut n = vec![0usize; self.batch];
        for (&l, &e) in self.token_loss.iter().zip(&self.token_example) {
            sum[e] += l as f64;
            n[e] += 1;
        }
        sum.iter().zip(&n).map(|(s, &k)| s / k as f64).collect()
    }
}

/// Everything a pass of one batch shape allocates, kept for the next batch of that shape.
struct Workspace<B: Backend> {
    shape: (usize, usize, usize),
    encoder: Encoder<B>,
    decoder: Decoder<B>,
    head: LmHead<B>,
}

pub struct Bert2Bert<B: Backend> {
    pub config: ModelConfig,
    pub table: ParamTable,
    view: ModelView,
    /// The fp32 master parameters (what the optimizer updates and checkpoints hold).
    pub params: B::Buf,
    pub grads: B::Buf,
    /// The GEMM copy of `params` at the backend's activation dtype, when that is not fp32
    /// (mixed precision): refreshed from `params` at the start of every pass, so an update of
    /// `params` between passes needs no bookkeeping.
    gemm_params: Option<B::Buf>,
    /// `gemm_params` was written by the last optimizer step (`update`) and nothing has read it
    /// since: the next pass uses it as it is instead of converting `params` again.
    gemm_params_current: bool,
    /// The weight gradients not yet written since `zero_grads` (see `FreshGrads`).
    fresh_grads: FreshGrads,
    ws: Option<Workspace<B>>,
    /// Label rows the LM head projects at once; `None`: what the backend's
    /// `logits_chunk_floats` allows.
    head_chunk_rows: Option<usize>,
    /// Wall time of each phase of the last pass, in ms. Backends that queue work
    /// asynchronously only show where the host waited, unless they synchronise.
    pub phases: Vec<(&'static str, f64)>,
}

/// The parameters as a pass reads them (see `Weights`), from `Bert2Bert`'s two fields (a free
/// function, so the borrow stays on those fields while `grads` is borrowed mutably).
fn weights_of<'a, B: Backend>(
    params: &'a B::Buf,
    gemm_params: &'a Option<B::Buf>,
    fresh: &'a FreshGrads,
) -> Weights<'a, B> {
    Weights { master: params, gemm: gemm_params.as_ref().unwrap_or(params), fresh }
}

/// Phase timer of one pass.
struct Clock {
    last: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
}

impl Clock {
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.phases.push((name, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }
}

impl<B: Backend> Bert2Bert<B> {
    pub fn new(b: &B, config: ModelConfig, table: ParamTable, host_params: &[f32]) -> Result<Self> {
        if host_params.len() != table.storage_len {
            return Err(Error::Other(format!(
                "parameter buffer has {} values, table needs {}",
                host_params.len(),
                table.storage_len
            )));
        }
        let view = table.view(&config);
        Ok(Self {
            params: b.upload(host_params)?,
            grads: b.zeros(table.storage_len)?,
            gemm_params: None,
            gemm_params_current: false,
            fresh_grads: FreshGrads::default(),
            config,
            table,
            view,
            ws: None,
            head_chunk_rows: None,
            phases: Vec::new(),
        })
    }

    /// Logits `[label tokens, vocab]` of the last pass (rows in label order), for tests and tools.
    /// The pass keeps none: they are recomputed from its LN output with the current parameters
    /// (the same as the pass's unless the parameters changed since).
    pub fn last_logits(&self, b: &B, label_tokens: usize) -> Result<Vec<f32>> {
        let ws = self.ws.as_ref().ok_or_else(|| Error::Other("no pass has run yet".into()))?;
        let word = self.view.decoder.embeddings.word.clone();
        let p = weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads);
        Ok(ws.head.logits(b, &p, &self.view.lm_head, word, label_tokens)?)
    }

    /// How many label rows the LM head projects to the vocabulary at once (at least 1); `None`
    /// (the default) leaves it to the backend (`Memory::logits_chunk_floats`; one chunk on the
    /// CPU). Results agree across chunk sizes up to fp32 summation order.
    pub fn set_lm_head_chunk_rows(&mut self, rows: Option<usize>) {
        self.head_chunk_rows = rows;
        self.ws = None;
    }

    /// Bring the GEMM copy of the parameters up to date with `params` (one conversion pass over
    /// them), or drop it on a backend whose activations are fp32.
    fn refresh_gemm_params(&mut self, b: &B) -> Result<()> {
        let written_by_update = std::mem::take(&mut self.gemm_params_current);
        if b.activation_dtype() == kernels::Dtype::F32 {
            self.gemm_params = None;
            return Ok(());
        }
        let n = self.table.storage_len;
        if written_by_update && self.gemm_params.as_ref().is_some_and(|g| b.len(g) == n) {
            return Ok(());
        }
        if self.gemm_params.as_ref().is_none_or(|g| b.len(g) != n) {
            self.gemm_params = Some(b.activations(n)?);
        }
        let copy = self.gemm_params.as_mut().expect("allocated above");
        b.copy(r(b, &self.params), w(b, copy))?;
        Ok(())
    }

    /// One optimizer step on `params` ([`Optimizer::update_clipped`]: clipped to `max_norm`,
    /// 0 for none), which in mixed precision also writes the GEMM copy of the updated weights,
    /// so the next pass skips converting them. The next pass then trusts that copy: write
    /// `params` yourself before `update` or after that pass, not between the two.
    pub fn update(&mut self, b: &B, opt: &mut Optimizer<B>, lr: f32, max_norm: f32) -> Result<()> {
        let copy = self.gemm_params.as_mut().filter(|_| b.activation_dtype() != kernels::Dtype::F32);
        let has_copy = copy.is_some();
        opt.update_clipped_with_copy(b, &mut self.params, &self.grads, copy, lr, max_norm)?;
        self.gemm_params_current = has_copy;
        Ok(())
    }

    /// Say that `params` was written from outside (a checkpoint load, a broadcast): the next
    /// pass converts the GEMM copy again even right after an `update`.
    pub fn params_written(&mut self) {
        self.gemm_params_current = false;
    }

    /// Zero `grads` for a new step; the step's first write of each weight gradient may then
    /// assign instead of accumulating (`FreshGrads`). Write into `grads` yourself only between
    /// a step's passes and the next `zero_grads` (an all-reduce, clipping), not before its
    /// first pass.
    pub fn zero_grads(&mut self, b: &B) -> Result<()> {
        b.fill(w(b, &mut self.grads), 0.0)?;
        self.fresh_grads.arm();
        Ok(())
    }

    fn workspace(&mut self, b: &B, batch: usize, s: usize, t: usize) -> Result<Workspace<B>> {
        if let Some(ws) = self.ws.take()
            && ws.shape == (batch, s, t)
        {
            return Ok(ws);
        }
        let (ec, dc) = (&self.config.encoder, &self.config.decoder);
        let chunk_rows = self.head_chunk_rows.or_else(|| b.logits_chunk_floats().map(|n| n / dc.vocab_size.max(1)));
        Ok(Workspace {
            shape: (batch, s, t),
            encoder: Encoder::new(b, ec, &StackPass::eval(ec, ec, batch), s)?,
            decoder: Decoder::new(b, dc, &StackPass::eval(dc, ec, batch), t, s)?,
            head: LmHead::new(b, batch * t, dc.hidden_size, dc.vocab_size, chunk_rows)?,
        })
    }

    /// Forward, then backward when `opts.grad_scale` is set. Parameter gradients ACCUMULATE
    /// into `self.grads` (call `zero_grads` before the first micro-batch of a step).
    pub fn pass(&mut self, b: &B, x: &Inputs<B>, opts: PassOptions) -> Result<BatchLoss> {
        self.pass_hooked(b, x, opts, None)
    }

    /// `pass`, and during backward `on_final(range, grads)` each time a range of `self.grads`
    /// becomes final for this pass: nothing later in backward writes to it. The ranges come top
    /// down (`[a, len)` first, `[0, b)` last), cover the buffer exactly once, and are the same
    /// for every batch. An error from `on_final` stops the pass.
    pub fn pass_with_final_grads(
        &mut self,
        b: &B,
        x: &Inputs<B>,
        opts: PassOptions,
        on_final: &mut FinalGrads<'_, B::Buf>,
    ) -> Result<BatchLoss> {
        self.pass_hooked(b, x, opts, Some(on_final))
    }

    fn pass_hooked(
        &mut self,
        b: &B,
        x: &Inputs<B>,
        opts: PassOptions,
        on_final: Option<&mut FinalGrads<'_, B::Buf>>,
    ) -> Result<BatchLoss> {
        self.refresh_gemm_params(b)?;
        let mut ws = self.workspace(b, x.batch, x.src_len, x.tgt_len)?;
        let mut clock = Clock { last: std::time::Instant::now(), phases: Vec::new() };
        let out = self.run(b, x, opts, &mut ws, &mut clock, on_final);
        self.ws = Some(ws);
        self.phases = clock.phases;
        out
    }

    fn run(
        &mut self,
        b: &B,
        x: &Inputs<B>,
        opts: PassOptions,
        ws: &mut Workspace<B>,
        clock: &mut Clock,
        on_final: Option<&mut FinalGrads<'_, B::Buf>>,
    ) -> Result<BatchLoss> {
        self.forward(b, x, opts, ws, clock)?;
        self.loss(b, x, opts, ws, clock)?;
        if opts.grad_scale.is_some() {
            self.backward(b, x, opts, ws, clock, on_final)?;
        }
        // The token losses are read back only now, after backward is queued: a read-back
        // between forward and backward would make the host wait for the device mid-pass and
        // leave the device idle while backward's launches are issued.
        let m = x.label_tokens();
        Ok(BatchLoss { token_loss: ws.head.token_losses(b, m)?, token_example: x.row_example.clone(), batch: x.batch })
    }

    /// Each stack's settings for this pass: (encoder, decoder).
    fn stack_passes(&self, batch: usize, opts: &PassOptions) -> (StackPass, StackPass) {
        let (ec, dc) = (&self.config.encoder, &self.config.decoder);
        (StackPass::new(ec, ec, batch, opts), StackPass::new(dc, ec, batch, opts))
    }

    /// Encoder, decoder, and the LM head up to its LN output on the label rows.
    fn forward(&self, b: &B, x: &Inputs<B>, opts: PassOptions, ws: &mut Workspace<B>, clock: &mut Clock) -> Result<()> {
        let (ec, dc) = (&self.config.encoder, &self.config.decoder);
        for (name, len, max) in [("source", x.src_len, ec.max_positions()), ("target", x.tgt_len, dc.max_positions())] {
            if len > max {
                return Err(Error::Other(format!("{name} length {len} exceeds the {max} positions of the model")));
            }
        }
        let (esp, dsp) = self.stack_passes(x.batch, &opts);
        let (p, view) = (&weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads), &self.view);
        ws.encoder.forward(b, p, &view.encoder, &x.src, &x.src_mask, &esp)?;
        clock.mark("encoder_fwd");
        let enc = Encoded { states: ws.encoder.output(), mask: &x.src_mask, len: x.src_len };
        ws.decoder.forward(b, p, &view.decoder, &x.dec, &x.dec_mask, &enc, &dsp)?;
        clock.mark("decoder_fwd");
        let m = x.label_tokens();
        ws.head.forward(b, p, &view.lm_head, ws.decoder.output(), &x.label_rows, m, dc.layer_norm_eps)?;
        Ok(())
    }

    /// The vocabulary projection and the token losses of the label rows, a chunk of rows at a
    /// time. With `opts.grad_scale`, each chunk's logit gradient goes on through the projection
    /// at once: the LM-head bias and word-embedding gradients ACCUMULATE into `self.grads` here,
    /// and `backward` starts from d(LN output). Nothing is reported final here: the head's
    /// `grad_ready` stage (which lists these ranges) ends in `backward`.
    fn loss(
        &mut self,
        b: &B,
        x: &Inputs<B>,
        opts: PassOptions,
        ws: &mut Workspace<B>,
        clock: &mut Clock,
    ) -> Result<()> {
        let m = x.label_tokens();
        let (p, view) = (&weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads), &self.view);
        let word = view.decoder.embeddings.word.clone();
        let grad = opts.grad_scale.map(|scale| (scale, &mut self.grads));
        ws.head.loss(b, p, &view.lm_head, word, &x.labels, m, opts.label_smoothing, grad)?;
        clock.mark("lm_head_fwd_loss");
        Ok(())
    }

    /// Head (from d(LN output), after `loss` did its vocabulary part), decoder, encoder, top
    /// down, accumulating into `self.grads`. Each block's stages
    /// (see `grad_ready`) report their finished ranges to `on_final`.
    fn backward(
        &mut self,
        b: &B,
        x: &Inputs<B>,
        opts: PassOptions,
        ws: &mut Workspace<B>,
        clock: &mut Clock,
        on_final: Option<&mut FinalGrads<'_, B::Buf>>,
    ) -> Result<()> {
        let (esp, dsp) = self.stack_passes(x.batch, &opts);
        let (p, g, view) =
            (&weights_of::<B>(&self.params, &self.gemm_params, &self.fresh_grads), &mut self.grads, &self.view);
        let mut ready = on_final.map(|h| GradReady::new(view, self.table.storage_len, h));
        let rows = (x.label_tokens(), x.batch * x.tgt_len);
        // The head's vocabulary part (bias, E) already ran in `loss`; its stage ends here.
        ws.head.backward(b, p, g, &view.lm_head, &x.label_rows, rows, ws.decoder.grad_of_output())?;
        stage_done(&mut ready, g)?;
        clock.mark("lm_head_bwd");
        let enc = Encoded { states: ws.encoder.output(), mask: &x.src_mask, len: x.src_len };
        ws.decoder.backward(b, p, g, &view.decoder, (&x.dec, &x.dec_mask), &enc, &dsp, &mut ready)?;
        clock.mark("decoder_bwd");
        let d_enc = ws.decoder.grad_of_encoded();
        ws.encoder.backward(b, p, g, &view.encoder, (&x.src, &x.src_mask), &esp, d_enc, &mut ready)?;
        clock.mark("encoder_bwd");
        Ok(())
    }
}
