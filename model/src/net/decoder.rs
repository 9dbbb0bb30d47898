//! The decoder stack: embeddings, then BERT layers with causal self-attention, cross-attention
//! over the encoder output and feed-forward, forward and backward, with every activation and
//! gradient buffer a pass of one batch shape needs. Dropout sites: `site::DEC_EMB` and
//! `site::dec(layer, _)`.

use kernels::Backend;

use super::grad_ready::{GradReady, stage_done};
use super::layers::{AttnActs, EmbActs, EmbIds, FfnActs, KResult, NormActs, Scratch, Weights, r, w};
use super::stack::{StackPass, site};
use crate::config::BertConfig;
use crate::error::Result;
use crate::params::{AttentionView, LayerView, StackView};

/// What cross-attention reads: the encoder output `[batch * len, hidden]` and its key mask.
pub(super) struct Encoded<'a, B: Backend> {
    pub states: &'a B::Buf,
    pub mask: &'a B::Buf,
    pub len: usize,
}

/// One decoder layer: causal self-attention, cross-attention, feed-forward.
struct DecoderLayer<B: Backend> {
    attn: AttnActs<B>,
    cross: AttnActs<B>,
    ffn: FfnActs<B>,
}

fn cross_view(lv: &LayerView) -> &AttentionView {
    lv.cross_attn.as_ref().expect("decoder layers have cross-attention")
}

impl<B: Backend> DecoderLayer<B> {
    fn new(b: &B, cfg: &BertConfig, sp: &StackPass, len: usize, src_len: usize) -> KResult<Self> {
        Ok(Self {
            attn: AttnActs::new(b, &sp.attention(len, len, true, 0))?,
            cross: AttnActs::new(b, &sp.attention(len, src_len, false, 0))?,
            ffn: FfnActs::new(b, sp.batch * len, cfg.hidden_size, cfg.intermediate_size)?,
        })
    }

    fn output(&self) -> &B::Buf {
        &self.ffn.norm.out
    }

    /// Layer `l` of a pass over targets of `len` tokens; `mask` is the self-attention key mask.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        lv: &LayerView,
        sp: &StackPass,
        l: usize,
        len: usize,
        input: &B::Buf,
        mask: &B::Buf,
        enc: &Encoded<'_, B>,
    ) -> KResult<()> {
        self.attn.forward(
            b,
            p,
            &lv.self_attn,
            sp.attention(len, len, true, site::dec(l, site::ATTN_PROBS)),
            r(b, input),
            r(b, input),
            r(b, mask),
            sp.hidden(site::dec(l, site::ATTN_OUT)),
            sp.eps,
        )?;
        self.cross.forward(
            b,
            p,
            cross_view(lv),
            sp.attention(len, enc.len, false, site::dec(l, site::CROSS_PROBS)),
            r(b, &self.attn.norm.out),
            r(b, enc.states),
            r(b, enc.mask),
            sp.hidden(site::dec(l, site::CROSS_OUT)),
            sp.eps,
        )?;
        let rows = sp.batch * len;
        self.ffn.forward(b, p, lv, r(b, &self.cross.norm.out), rows, sp.hidden(site::dec(l, site::FFN_OUT)), sp.eps)
    }

    /// The gradient of the layer's output in `d[0]` becomes that of its `input` in `d[0]`;
    /// `d[1]` is scratch. The encoder output's gradient ACCUMULATES into `d_enc`, parameter
    /// gradients into `g`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        lv: &LayerView,
        sp: &StackPass,
        (l, len): (usize, usize),
        (input, mask): (&B::Buf, &B::Buf),
        enc: &Encoded<'_, B>,
        d: &mut [B::Buf; 2],
        d_enc: &mut B::Buf,
        sc: &mut Scratch<B>,
    ) -> KResult<()> {
        let [d_a, d_b] = &mut *d;
        let rows = sp.batch * len;
        let ffn_drop = sp.hidden(site::dec(l, site::FFN_OUT));
        self.ffn.backward(b, p, g, lv, r(b, &self.cross.norm.out), rows, ffn_drop, r(b, d_a), d_b, sc)?;
        self.cross.backward(
            b,
            p,
            g,
            cross_view(lv),
            sp.attention(len, enc.len, false, site::dec(l, site::CROSS_PROBS)),
            r(b, &self.attn.norm.out),
            r(b, enc.states),
            r(b, enc.mask),
            sp.hidden(site::dec(l, site::CROSS_OUT)),
            r(b, d_b),
            d_a,
            Some(d_enc),
            sc,
        )?;
        self.attn.backward(
            b,
            p,
            g,
            &lv.self_attn,
            sp.attention(len, len, true, site::dec(l, site::ATTN_PROBS)),
            r(b, input),
            r(b, input),
            r(b, mask),
            sp.hidden(site::dec(l, site::ATTN_OUT)),
            r(b, d_a),
            d_b,
            None,
            sc,
        )?;
        d.swap(0, 1);
        Ok(())
    }
}

/// The decoder's activations and gradient buffers for batches of one shape.
pub(super) struct Decoder<B: Backend> {
    /// Target length and hidden size this workspace is sized for.
    len: usize,
    hidden: usize,
    emb: EmbActs<B>,
    layers: Vec<DecoderLayer<B>>,
    scratch: Scratch<B>,
    /// Gradient ping-pong through the layers; until decoder backward, free for the LM head's
    /// backward (see `grad_of_output`).
    d: [B::Buf; 2],
    /// The encoder output's gradient, which every cross-attention block accumulates into.
    d_enc: B::Buf,
}

impl<B: Backend> Decoder<B> {
    /// Sized for `sp.batch` targets of `len` tokens over sources of `src_len`.
    pub(super) fn new(b: &B, cfg: &BertConfig, sp: &StackPass, len: usize, src_len: usize) -> KResult<Self> {
        let c = cfg.hidden_size;
        let (rows, src_rows) = (sp.batch * len, sp.batch * src_len);
        Ok(Self {
            len,
            hidden: c,
            emb: EmbActs { norm: NormActs::new(b, rows, c)? },
            layers: (0..cfg.num_hidden_layers)
                .map(|_| DecoderLayer::new(b, cfg, sp, len, src_len))
                .collect::<KResult<_>>()?,
            scratch: Scratch::new(b, rows, src_rows.max(rows), c, cfg.intermediate_size)?,
            d: [b.activations(rows * c)?, b.activations(rows * c)?],
            d_enc: b.activations(src_rows * c)?,
        })
    }

    /// The decoder output (the last layer's), after `forward`.
    pub(super) fn output(&self) -> &B::Buf {
        self.layers.last().map(DecoderLayer::output).unwrap_or(&self.emb.norm.out)
    }

    /// Where backward expects the gradient of the decoder output: in `[0]`, `[1]` being free
    /// scratch until then.
    pub(super) fn grad_of_output(&mut self) -> &mut [B::Buf; 2] {
        &mut self.d
    }

    /// The encoder output's gradient, after `backward`.
    pub(super) fn grad_of_encoded(&self) -> &B::Buf {
        &self.d_enc
    }

    /// Decodes `ids` (`[batch, len]`) over `enc`; `mask` is the self-attention key mask.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        view: &StackView,
        ids: &EmbIds<B>,
        mask: &B::Buf,
        enc: &Encoded<'_, B>,
        sp: &StackPass,
    ) -> KResult<()> {
        self.emb.forward(b, p, &view.embeddings, ids, self.hidden, sp.hidden(site::DEC_EMB), sp.eps)?;
        for l in 0..self.layers.len() {
            let (done, rest) = self.layers.split_at_mut(l);
            let input = done.last().map(DecoderLayer::output).unwrap_or(&self.emb.norm.out);
            rest[0].forward(b, p, &view.layers[l], sp, l, self.len, input, mask, enc)?;
        }
        Ok(())
    }

    /// Backward from the gradient of the decoder output (in `grad_of_output()[0]`); leaves the
    /// encoder output's in `grad_of_encoded()`. Each layer (top down), then the embeddings, is
    /// one stage of `ready`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        view: &StackView,
        (ids, mask): (&EmbIds<B>, &B::Buf),
        enc: &Encoded<'_, B>,
        sp: &StackPass,
        ready: &mut Option<GradReady<'_, B::Buf>>,
    ) -> Result<()> {
        b.fill(w(b, &mut self.d_enc), 0.0)?;
        for l in (0..self.layers.len()).rev() {
            let input = if l == 0 { &self.emb.norm.out } else { self.layers[l - 1].output() };
            let (lv, d, d_enc, sc) = (&view.layers[l], &mut self.d, &mut self.d_enc, &mut self.scratch);
            self.layers[l].backward(b, p, g, lv, sp, (l, self.len), (input, mask), enc, d, d_enc, sc)?;
            stage_done(ready, g)?;
        }
        let [d_out, d_sum] = &mut self.d;
        self.emb.backward(b, p, g, &view.embeddings, ids, self.hidden, sp.hidden(site::DEC_EMB), d_out, d_sum)?;
        stage_done(ready, g)
    }
}
