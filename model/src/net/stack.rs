//! What the encoder and decoder stacks share in one pass: the stable ids of their dropout sites,
//! and the per-pass settings (dropout rates and seed, LayerNorm epsilon, attention geometry)
//! from which each block derives its attention shapes and dropout masks.

use kernels::AttentionShape;

use super::PassOptions;
use super::layers::Dropout;
use crate::config::BertConfig;

/// Stable ids of the dropout sites, so a seed reproduces the same masks on any backend.
pub(super) mod site {
    pub const ENC_EMB: u64 = 1;
    pub const DEC_EMB: u64 = 2;
    pub const fn enc(layer: usize, k: u64) -> u64 {
        100 + 10 * layer as u64 + k
    }
    pub const fn dec(layer: usize, k: u64) -> u64 {
        10_000 + 10 * layer as u64 + k
    }
    pub const ATTN_PROBS: u64 = 0;
    pub const ATTN_OUT: u64 = 1;
    pub const CROSS_PROBS: u64 = 2;
    pub const CROSS_OUT: u64 = 3;
    pub const FFN_OUT: u64 = 4;
}

/// One stack's settings for one pass.
#[derive(Clone, Copy, Debug)]
pub(super) struct StackPass {
    pub drop: Dropout,
    pub eps: f32,
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl StackPass {
    /// Dropout off (evaluation, and sizing a workspace). `stack` is the stack's own config;
    /// `attn` the one whose heads/head_dim both stacks use (the encoder's).
    pub fn eval(stack: &BertConfig, attn: &BertConfig, batch: usize) -> Self {
        Self {
            drop: Dropout::off(),
            eps: stack.layer_norm_eps,
            batch,
            heads: attn.num_attention_heads,
            head_dim: attn.head_dim(),
        }
    }

    /// With `stack`'s dropout rates when `opts.train`, seeded by `opts.seed`.
    pub fn new(stack: &BertConfig, attn: &BertConfig, batch: usize, opts: &PassOptions) -> Self {
        let mut sp = Self::eval(stack, attn, batch);
        if opts.train {
            sp.drop = Dropout {
                hidden: stack.hidden_dropout_prob,
                attention: stack.attention_probs_dropout_prob,
                seed: opts.seed,
            };
        }
        sp
    }

    /// Shape of an attention with `tq` queries over `tk` keys, its probabilities' dropout seeded
    /// by `site`.
    pub fn attention(&self, tq: usize, tk: usize, causal: bool, site: u64) -> AttentionShape {
        AttentionShape::new(self.batch, self.heads, self.head_dim, tq, tk)
            .with_causal(causal)
            .with_dropout(self.drop.attention, self.drop.site(site))
    }

    /// Hidden-state dropout (rate, seed) at `site`.
    pub fn hidden(&self, site: u64) -> (f32, u64) {
        (self.drop.hidden, self.drop.site(site))
    }
}
