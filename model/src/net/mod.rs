//! BERT2BERT forward and hand-written backward on any `kernels::Backend`.
//!
//! Encoder: BERT (post-LN). Decoder: BERT with causal self-attention and a cross-attention block
//! after it in every layer. LM head: `LN(gelu(h W_t^T + b_t)) E^T + bias`, E the decoder word
//! embeddings (tied). Loss: token cross-entropy over the label positions.
//!
//! The LM head runs only on rows whose label is not ignored: padding rows cost nothing in the
//! largest GEMMs (the projection to the vocabulary) and the loss.

mod encoder;
mod generate;
mod grad_ready;
mod layers;
mod stack;

pub use generate::{GenerateOptions, Generated, LengthPenaltyKind};

use kernels::{AttentionShape, Backend, GemmShape, IGNORE_INDEX, Operand};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::params::{ModelView, ParamTable};
use encoder::{Encoder, EncoderLayer};
use grad_ready::{GradReady, stage_done};
use layers::{AttnActs, Dropout, EmbActs, EmbIds, FfnActs, NormActs, Scratch, matmul_wt, r, w};
use stack::{StackPass, site};

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

struct DecoderLayer<B: Backend> {
    attn: AttnActs<B>,
    cross: AttnActs<B>,
    ffn: FfnActs<B>,
}

/// LM head activations, sized for every decoder row; a pass uses the first `m` label rows.
struct HeadActs<B: Backend> {
    hidden: B::Buf,
    pre: B::Buf,
    act: B::Buf,
    norm: NormActs<B>,
    logits: B::Buf,
    dlogits: B::Buf,
    losses: B::Buf,
}

/// Everything a pass of one batch shape allocates, kept for the next batch of that shape.
struct Workspace<B: Backend> {
    shape: (usize, usize, usize),
    encoder: Encoder<B>,
    dec_emb: EmbActs<B>,
    dec: Vec<DecoderLayer<B>>,
    head: HeadActs<B>,
    dec_scratch: Scratch<B>,
    /// Gradient buffers: two to ping-pong through the layers, plus the encoder output's
    /// gradient that all cross-attention blocks accumulate into.
    d_dec: [B::Buf; 2],
    d_enc_out: B::Buf,
}

pub struct Bert2Bert<B: Backend> {
    pub config: ModelConfig,
    pub table: ParamTable,
    view: ModelView,
    pub params: B::Buf,
    pub grads: B::Buf,
    ws: Option<Workspace<B>>,
    /// Wall time of each phase of the last pass, in ms. Backends that queue work
    /// asynchronously only show where the host waited, unless they synchronise.
    pub phases: Vec<(&'static str, f64)>,
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
            config,
            table,
            view,
            ws: None,
            phases: Vec::new(),
        })
    }

    /// Logits `[label tokens, vocab]` of the last pass (rows in label order), for tests and tools.
    pub fn last_logits(&self, b: &B, label_tokens: usize) -> Result<Vec<f32>> {
        let ws = self.ws.as_ref().ok_or_else(|| Error::Other("no pass has run yet".into()))?;
        Ok(b.download(b.view(&ws.head.logits, 0..label_tokens * self.config.decoder.vocab_size))?)
    }

    pub fn zero_grads(&mut self, b: &B) -> Result<()> {
        Ok(b.fill(w(b, &mut self.grads), 0.0)?)
    }

    fn workspace(&mut self, b: &B, batch: usize, s: usize, t: usize) -> Result<Workspace<B>> {
        if let Some(ws) = self.ws.take()
            && ws.shape == (batch, s, t)
        {
            return Ok(ws);
        }
        let (ec, dc) = (&self.config.encoder, &self.config.decoder);
        let c = ec.hidden_size;
        let (ns, nt) = (batch * s, batch * t);
        let dec_shape = self.attn_shape(batch, t, t, true, Dropout::off(), 0);
        let cross_shape = self.attn_shape(batch, t, s, false, Dropout::off(), 0);
        let encoder = Encoder::new(b, ec, &StackPass::eval(ec, ec, batch), s)?;
        let dec = (0..dc.num_hidden_layers)
            .map(|_| {
                Ok(DecoderLayer {
                    attn: AttnActs::new(b, &dec_shape)?,
                    cross: AttnActs::new(b, &cross_shape)?,
                    ffn: FfnActs::new(b, nt, c, dc.intermediate_size)?,
                })
            })
            .collect::<kernels::Result<Vec<_>>>()?;
        let v = dc.vocab_size;
        Ok(Workspace {
            shape: (batch, s, t),
            encoder,
            dec_emb: EmbActs { norm: NormActs::new(b, nt, c)? },
            dec,
            head: HeadActs {
                hidden: b.zeros(nt * c)?,
                pre: b.zeros(nt * c)?,
                act: b.zeros(nt * c)?,
                norm: NormActs::new(b, nt, c)?,
                logits: b.zeros(nt * v)?,
                dlogits: b.zeros(nt * v)?,
                losses: b.zeros(nt)?,
            },
            dec_scratch: Scratch::new(b, nt, ns.max(nt), c, dc.intermediate_size)?,
            d_dec: [b.zeros(nt * c)?, b.zeros(nt * c)?],
            d_enc_out: b.zeros(ns * c)?,
        })
    }

    fn attn_shape(&self, batch: usize, tq: usize, tk: usize, causal: bool, d: Dropout, site: u64) -> AttentionShape {
        let c = &self.config.encoder;
        AttentionShape {
            batch,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            tq,
            tk,
            causal,
            dropout: d.attention,
            seed: d.site(site),
        }
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
        let mut ws = self.workspace(b, x.batch, x.src_len, x.tgt_len)?;
        let mut clock = Clock { last: std::time::Instant::now(), phases: Vec::new() };
        let out = self.pass_in(b, x, opts, &mut ws, &mut clock, on_final);
        self.ws = Some(ws);
        self.phases = clock.phases;
        out
    }

    fn pass_in(
        &mut self,
        b: &B,
        x: &Inputs<B>,
        opts: PassOptions,
        ws: &mut Workspace<B>,
        clock: &mut Clock,
        on_final: Option<&mut FinalGrads<'_, B::Buf>>,
    ) -> Result<BatchLoss> {
        let (ec, dc) = (self.config.encoder.clone(), self.config.decoder.clone());
        let c = ec.hidden_size;
        let (bs, s, t) = (x.batch, x.src_len, x.tgt_len);
        let nt = bs * t;
        let m = x.label_tokens();
        let v = dc.vocab_size;
        for (name, len, max) in [("source", s, ec.max_position_embeddings), ("target", t, dc.max_position_embeddings)] {
            if len > max {
                return Err(Error::Other(format!("{name} length {len} exceeds max_position_embeddings {max}")));
            }
        }
        let dd = StackPass::new(&dc, &ec, bs, &opts).drop;
        let (heads, head_dim) = (ec.num_attention_heads, ec.head_dim());
        let shape = |tq: usize, tk: usize, causal: bool, d: Dropout, site: u64| AttentionShape {
            batch: bs,
            heads,
            head_dim,
            tq,
            tk,
            causal,
            dropout: d.attention,
            seed: d.site(site),
        };
        let p = &self.params;
        let view = &self.view;

        // ---- encoder ----
        let esp = StackPass::new(&ec, &ec, bs, &opts);
        ws.encoder.forward(b, p, &view.encoder, &x.src, &x.src_mask, &esp)?;
        let enc_out = ws.encoder.output();
        clock.mark("encoder_fwd");

        // ---- decoder ----
        ws.dec_emb.forward(
            b,
            p,
            &view.decoder.embeddings,
            &x.dec,
            c,
            (dd.hidden, dd.site(site::DEC_EMB)),
            dc.layer_norm_eps,
        )?;
        for l in 0..ws.dec.len() {
            let (done, rest) = ws.dec.split_at_mut(l);
            let input = done.last().map(|e| &e.ffn.norm.out).unwrap_or(&ws.dec_emb.norm.out);
            let lv = &view.decoder.layers[l];
            let cv = lv.cross_attn.as_ref().expect("decoder layers have cross-attention");
            let layer = &mut rest[0];
            let sh = shape(t, t, true, dd, site::dec(l, site::ATTN_PROBS));
            layer.attn.forward(
                b,
                p,
                &lv.self_attn,
                sh,
                r(b, input),
                r(b, input),
                r(b, &x.dec_mask),
                (dd.hidden, dd.site(site::dec(l, site::ATTN_OUT))),
                dc.layer_norm_eps,
            )?;
            let sh = shape(t, s, false, dd, site::dec(l, site::CROSS_PROBS));
            layer.cross.forward(
                b,
                p,
                cv,
                sh,
                r(b, &layer.attn.norm.out),
                r(b, enc_out),
                r(b, &x.src_mask),
                (dd.hidden, dd.site(site::dec(l, site::CROSS_OUT))),
                dc.layer_norm_eps,
            )?;
            layer.ffn.forward(
                b,
                p,
                lv,
                r(b, &layer.cross.norm.out),
                nt,
                (dd.hidden, dd.site(site::dec(l, site::FFN_OUT))),
                dc.layer_norm_eps,
            )?;
        }
        let dec_out = ws.dec.last().map(|e| &e.ffn.norm.out).unwrap_or(&ws.dec_emb.norm.out);
        clock.mark("decoder_fwd");

        // ---- LM head on the label rows only ----
        let hv = &view.lm_head;
        let word = view.decoder.embeddings.word.clone();
        let head = &mut ws.head;
        let mc = m * c;
        b.embedding_forward(&x.label_rows, r(b, dec_out), c, b.view_mut(&mut head.hidden, 0..mc), false)?;
        matmul_wt(b, p, &hv.transform, b.view(&head.hidden, 0..mc), m, b.view_mut(&mut head.pre, 0..mc))?;
        b.bias_gelu_forward(
            b.view_mut(&mut head.pre, 0..mc),
            b.view(p, hv.transform.b.clone()),
            b.view_mut(&mut head.act, 0..mc),
        )?;
        {
            let n = &mut head.norm;
            b.layernorm_forward(
                b.view(&head.act, 0..mc),
                b.view(p, hv.norm.gamma.clone()),
                b.view(p, hv.norm.beta.clone()),
                dc.layer_norm_eps,
                b.view_mut(&mut n.out, 0..mc),
                b.view_mut(&mut n.mean, 0..m),
                b.view_mut(&mut n.rstd, 0..m),
            )?;
        }
        let mv = m * v;
        b.gemm(
            GemmShape::plain(m, v, c),
            1.0,
            b.view(&head.norm.out, 0..mc),
            Operand::n(c),
            b.view(p, word.clone()),
            Operand::t(c),
            0.0,
            b.view_mut(&mut head.logits, 0..mv),
        )?;
        b.add_bias(b.view_mut(&mut head.logits, 0..mv), b.view(p, hv.bias.clone()), v)?;
        let dlogits = opts.grad_scale.map(|_| b.view_mut(&mut head.dlogits, 0..mv));
        b.cross_entropy(
            b.view(&head.logits, 0..mv),
            &x.labels,
            v,
            opts.label_smoothing,
            opts.grad_scale.unwrap_or(0.0),
            b.view_mut(&mut head.losses, 0..m),
            dlogits,
        )?;
        clock.mark("lm_head_fwd_loss");
        let loss = BatchLoss {
            token_loss: b.download(b.view(&head.losses, 0..m))?,
            token_example: x.row_example.clone(),
            batch: bs,
        };
        if opts.grad_scale.is_none() {
            return Ok(loss);
        }

        // ---- backward: LM head ----
        let mut ready = on_final.map(|h| GradReady::new(view, self.table.storage_len, h));
        let g = &mut self.grads;
        let dl = b.view(&head.dlogits, 0..mv);
        b.bias_grad(dl, b.view_mut(g, hv.bias.clone()), v)?;
        b.gemm(
            GemmShape::plain(v, c, m),
            1.0,
            dl,
            Operand::t(v),
            b.view(&head.norm.out, 0..mc),
            Operand::n(c),
            1.0,
            b.view_mut(g, word.clone()),
        )?;
        // d(normed) into `hidden`'s spare twin `pre`? No: `pre` is still needed by GELU backward,
        // so the LN output gradient goes to the decoder ping-pong buffer (free until the layers).
        let [d_a, d_b] = &mut ws.d_dec;
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
        {
            let n = &head.norm;
            let (dg, db) = b.view_mut2(g, hv.norm.gamma.clone(), hv.norm.beta.clone());
            b.layernorm_backward(
                b.view(d_a, 0..mc),
                b.view(&head.act, 0..mc),
                b.view(p, hv.norm.gamma.clone()),
                b.view(&n.mean, 0..m),
                b.view(&n.rstd, 0..m),
                b.view_mut(d_b, 0..mc),
                false,
                dg,
                db,
            )?;
        }
        b.bias_gelu_backward(
            b.view(&head.pre, 0..mc),
            b.view(d_b, 0..mc),
            b.view_mut(d_a, 0..mc),
            b.view_mut(g, hv.transform.b.clone()),
        )?;
        layers::linear_backward(
            b,
            p,
            g,
            &hv.transform,
            b.view(&head.hidden, 0..mc),
            b.view(d_a, 0..mc),
            m,
            false,
            Some((b.view_mut(d_b, 0..mc), false)),
        )?;
        // Scatter the label rows' gradient back to all decoder rows (padding rows get 0).
        b.fill(b.view_mut(d_a, 0..nt * c), 0.0)?;
        b.embedding_backward(&x.label_rows, b.view(d_b, 0..mc), c, b.view_mut(d_a, 0..nt * c))?;

        stage_done(&mut ready, g)?;
        clock.mark("lm_head_bwd");
        // ---- backward: decoder ----
        b.fill(w(b, &mut ws.d_enc_out), 0.0)?;
        for l in (0..ws.dec.len()).rev() {
            let input = if l == 0 { &ws.dec_emb.norm.out } else { &ws.dec[l - 1].ffn.norm.out };
            let lv = &view.decoder.layers[l];
            let cv = lv.cross_attn.as_ref().expect("decoder layers have cross-attention");
            let layer = &ws.dec[l];
            let sc = &mut ws.dec_scratch;
            layer.ffn.backward(
                b,
                p,
                g,
                lv,
                r(b, &layer.cross.norm.out),
                nt,
                (dd.hidden, dd.site(site::dec(l, site::FFN_OUT))),
                r(b, d_a),
                d_b,
                sc,
            )?;
            let sh = shape(t, s, false, dd, site::dec(l, site::CROSS_PROBS));
            layer.cross.backward(
                b,
                p,
                g,
                cv,
                sh,
                r(b, &layer.attn.norm.out),
                r(b, enc_out),
                (dd.hidden, dd.site(site::dec(l, site::CROSS_OUT))),
                r(b, d_b),
                d_a,
                Some(&mut ws.d_enc_out),
                sc,
            )?;
            let sh = shape(t, t, true, dd, site::dec(l, site::ATTN_PROBS));
            layer.attn.backward(
                b,
                p,
                g,
                &lv.self_attn,
                sh,
                r(b, input),
                r(b, input),
                (dd.hidden, dd.site(site::dec(l, site::ATTN_OUT))),
                r(b, d_a),
                d_b,
                None,
                sc,
            )?;
            std::mem::swap(d_a, d_b);
            stage_done(&mut ready, g)?;
        }
        ws.dec_emb.backward(
            b,
            p,
            g,
            &view.decoder.embeddings,
            &x.dec,
            c,
            (dd.hidden, dd.site(site::DEC_EMB)),
            d_a,
            d_b,
        )?;
        stage_done(&mut ready, g)?;
        clock.mark("decoder_bwd");
        // ---- backward: encoder ----
        ws.encoder.backward(b, p, g, &view.encoder, &x.src, &esp, &ws.d_enc_out, &mut ready)?;
        clock.mark("encoder_bwd");
        Ok(loss)
    }
}
