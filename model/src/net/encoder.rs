//! The encoder stack: embeddings, then BERT layers (post-LN self-attention and feed-forward),
//! forward and backward, with every activation and gradient buffer a pass of one batch shape
//! needs. Dropout sites: `site::ENC_EMB` and `site::enc(layer, _)`.

use kernels::Backend;

use super::grad_ready::{GradReady, stage_done};
use super::layers::{AttnActs, EmbActs, EmbIds, FfnActs, KResult, NormActs, Scratch, Weights, r, w};
use super::stack::{StackPass, site};
use crate::config::BertConfig;
use crate::error::Result;
use crate::params::{LayerView, StackView};

/// One encoder layer: self-attention block, then feed-forward block.
pub(super) struct EncoderLayer<B: Backend> {
    pub(super) attn: AttnActs<B>,
    pub(super) ffn: FfnActs<B>,
}

impl<B: Backend> EncoderLayer<B> {
    fn new(b: &B, cfg: &BertConfig, sp: &StackPass, len: usize) -> KResult<Self> {
        Ok(Self {
            attn: AttnActs::new(b, &sp.attention(len, len, false, 0))?,
            ffn: FfnActs::new(b, sp.batch * len, cfg.hidden_size, cfg.intermediate_size)?,
        })
    }

    /// The layer's output (`[batch * len, hidden]`), after `forward`.
    pub(super) fn output(&self) -> &B::Buf {
        &self.ffn.norm.out
    }

    /// Layer `l` of a pass over sequences of `len` tokens.
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
    ) -> KResult<()> {
        self.attn.forward(
            b,
            p,
            &lv.self_attn,
            sp.attention(len, len, false, site::enc(l, site::ATTN_PROBS)),
            r(b, input),
            r(b, input),
            r(b, mask),
            sp.hidden(site::enc(l, site::ATTN_OUT)),
            sp.eps,
        )?;
        let rows = sp.batch * len;
        self.ffn.forward(b, p, lv, r(b, &self.attn.norm.out), rows, sp.hidden(site::enc(l, site::FFN_OUT)), sp.eps)
    }

    /// The gradient of the layer's output in `d[0]` becomes that of its `input` in `d[0]`;
    /// `d[1]` is scratch. Parameter gradients accumulate into `g`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        lv: &LayerView,
        sp: &StackPass,
        l: usize,
        len: usize,
        (input, mask): (&B::Buf, &B::Buf),
        d: &mut [B::Buf; 2],
        sc: &mut Scratch<B>,
    ) -> KResult<()> {
        let [d_a, d_b] = d;
        let rows = sp.batch * len;
        let ffn_drop = sp.hidden(site::enc(l, site::FFN_OUT));
        self.ffn.backward(b, p, g, lv, r(b, &self.attn.norm.out), rows, ffn_drop, r(b, d_a), d_b, sc)?;
        self.attn.backward(
            b,
            p,
            g,
            &lv.self_attn,
            sp.attention(len, len, false, site::enc(l, site::ATTN_PROBS)),
            r(b, input),
            r(b, input),
            r(b, mask),
            sp.hidden(site::enc(l, site::ATTN_OUT)),
            r(b, d_b),
            d_a,
            None,
            sc,
        )
    }
}

/// The encoder's activations and gradient buffers for batches of one shape.
pub(super) struct Encoder<B: Backend> {
    /// Source length and hidden size this workspace is sized for.
    len: usize,
    hidden: usize,
    emb: EmbActs<B>,
    layers: Vec<EncoderLayer<B>>,
    scratch: Scratch<B>,
    /// Gradient ping-pong through the layers.
    d: [B::Buf; 2],
}

impl<B: Backend> Encoder<B> {
    /// Sized for `sp.batch` sources of `len` tokens.
    pub(super) fn new(b: &B, cfg: &BertConfig, sp: &StackPass, len: usize) -> KResult<Self> {
        let (rows, c) = (sp.batch * len, cfg.hidden_size);
        Ok(Self {
            len,
            hidden: c,
            emb: EmbActs { norm: NormActs::new(b, rows, c)? },
            layers: (0..cfg.num_hidden_layers).map(|_| EncoderLayer::new(b, cfg, sp, len)).collect::<KResult<_>>()?,
            scratch: Scratch::new(b, rows, rows, c, cfg.intermediate_size)?,
            d: [b.activations(rows * c)?, b.activations(rows * c)?],
        })
    }

    /// The encoder output (the last layer's), after `forward`.
    pub(super) fn output(&self) -> &B::Buf {
        self.layers.last().map(EncoderLayer::output).unwrap_or(&self.emb.norm.out)
    }

    /// Encodes `ids` (`[batch, len]`), attending only to keys where `mask` is 1.
    pub(super) fn forward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        view: &StackView,
        ids: &EmbIds<B>,
        mask: &B::Buf,
        sp: &StackPass,
    ) -> KResult<()> {
        self.emb.forward(b, p, &view.embeddings, ids, self.hidden, sp.hidden(site::ENC_EMB), sp.eps)?;
        for l in 0..self.layers.len() {
            let (done, rest) = self.layers.split_at_mut(l);
            let input = done.last().map(EncoderLayer::output).unwrap_or(&self.emb.norm.out);
            rest[0].forward(b, p, &view.layers[l], sp, l, self.len, input, mask)?;
        }
        Ok(())
    }

    /// Backward from `d_out`, the gradient of the encoder output. Each layer (top down), then the
    /// embeddings, is one stage of `ready`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &mut self,
        b: &B,
        p: &Weights<'_, B>,
        g: &mut B::Buf,
        view: &StackView,
        (ids, mask): (&EmbIds<B>, &B::Buf),
        sp: &StackPass,
        d_out: &B::Buf,
        ready: &mut Option<GradReady<'_, B::Buf>>,
    ) -> Result<()> {
        b.copy(r(b, d_out), w(b, &mut self.d[0]))?;
        for l in (0..self.layers.len()).rev() {
            let input = if l == 0 { &self.emb.norm.out } else { self.layers[l - 1].output() };
            let lv = &view.layers[l];
            self.layers[l].backward(b, p, g, lv, sp, l, self.len, (input, mask), &mut self.d, &mut self.scratch)?;
            stage_done(ready, g)?;
        }
        let [d_out, d_sum] = &mut self.d;
        self.emb.backward(b, p, g, &view.embeddings, ids, self.hidden, sp.hidden(site::ENC_EMB), d_out, d_sum)?;
        stage_done(ready, g)
    }
}
