//! The parameter table: every HF EncoderDecoderModel tensor name mapped to a view of ONE flat
//! buffer. Gradients and AdamW moments use the same layout, so one all-reduce or one write
//! covers them all.
//!
//! Layout choices that the model code relies on:
//! - a Linear's `weight` is immediately followed by its `bias`, and a LayerNorm's `weight` by
//!   its `bias`;
//! - under bertShare, `decoder.bert.X` (`decoder.roberta.X`) is an alias of `encoder.X`: both
//!   names point at the same storage, so their gradients sum without extra work;
//! - the LM head's projection (`decoder.cls.predictions.decoder.weight`, RoBERTa's
//!   `decoder.lm_head.decoder.weight`) is never stored: it is the decoder's word embeddings, as
//!   in HF.
//!
//! Names follow the decoder's family (`ModelConfig::decoder_prefix`, `Family::head`); the
//! encoder is `encoder.` in both.

use std::collections::HashMap;
use std::ops::Range;

use crate::config::{BertConfig, ModelConfig};

#[derive(Clone, Debug)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Excluded from weight decay (biases and LayerNorm), as HF's Trainer does.
    pub no_decay: bool,
    /// Gets no gradient (the encoder pooler): AdamW must leave it untouched.
    pub frozen: bool,
    /// Index of the entry that owns the storage, when this name is an alias.
    pub alias_of: Option<usize>,
}

impl ParamEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

#[derive(Clone, Debug)]
pub struct ParamTable {
    pub entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
    /// Length of the flat buffer (aliases take no space).
    pub storage_len: usize,
}

/// Ranges of one Linear layer's weight `[out, in]` and bias `[out]`.
#[derive(Clone, Debug)]
pub struct LinearView {
    pub w: Range<usize>,
    pub b: Range<usize>,
    pub out_dim: usize,
    pub in_dim: usize,
}

/// Ranges of one LayerNorm's gamma and beta.
#[derive(Clone, Debug)]
pub struct NormView {
    pub gamma: Range<usize>,
    pub beta: Range<usize>,
}

#[derive(Clone, Debug)]
pub struct AttentionView {
    pub q: LinearView,
    pub k: LinearView,
    pub v: LinearView,
    pub out: LinearView,
    pub norm: NormView,
}

#[derive(Clone, Debug)]
pub struct LayerView {
    pub self_attn: AttentionView,
    pub cross_attn: Option<AttentionView>,
    pub inter: LinearView,
    pub output: LinearView,
    pub norm: NormView,
}

#[derive(Clone, Debug)]
pub struct EmbeddingsView {
    pub word: Range<usize>,
    /// The whole position table (what the optimizer and gradient zeroing see).
    pub position: Range<usize>,
    /// The rows that positions 0, 1, ... read: the table from the family's offset on (all of it
    /// for BERT; from `pad_token_id + 1` for RoBERTa), so position ids stay `0..T` everywhere.
    pub position_rows: Range<usize>,
    pub token_type: Range<usize>,
    pub norm: NormView,
}

#[derive(Clone, Debug)]
pub struct StackView {
    pub embeddings: EmbeddingsView,
    pub layers: Vec<LayerView>,
}

#[derive(Clone, Debug)]
pub struct LmHeadView {
    pub transform: LinearView,
    pub norm: NormView,
    pub bias: Range<usize>,
}

/// Typed ranges for the hot path, resolved once from the table's names.
#[derive(Clone, Debug)]
pub struct ModelView {
    pub encoder: StackView,
    pub decoder: StackView,
    pub lm_head: LmHeadView,
}

struct Builder {
    entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
    offset: usize,
}

impl Builder {
    fn push(&mut self, name: String, shape: Vec<usize>, no_decay: bool, frozen: bool) {
        let numel: usize = shape.iter().product();
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(ParamEntry { name, shape, offset: self.offset, no_decay, frozen, alias_of: None });
        self.offset += numel;
    }
    fn alias(&mut self, name: String, target: &str) {
        let t = self.index[target];
        let mut e = self.entries[t].clone();
        e.name = name.clone();
        e.alias_of = Some(t);
        self.index.insert(name, self.entries.len());
        self.entries.push(e);
    }
    fn linear(&mut self, prefix: &str, out_dim: usize, in_dim: usize) {
        self.push(format!("{prefix}.weight"), vec![out_dim, in_dim], false, false);
        self.push(format!("{prefix}.bias"), vec![out_dim], true, false);
    }
    fn norm(&mut self, prefix: &str, dim: usize) {
        self.push(format!("{prefix}.weight"), vec![dim], true, false);
        self.push(format!("{prefix}.bias"), vec![dim], true, false);
    }
}

/// The names of one BERT stack below `prefix` (e.g. `encoder.` or `decoder.bert.`), in layout
/// order, each with its shape and whether it is a LayerNorm/bias (no decay).
fn bert_stack(b: &mut Builder, prefix: &str, c: &BertConfig, cross: bool, pooler: bool) {
    let h = c.hidden_size;
    b.push(format!("{prefix}embeddings.word_embeddings.weight"), vec![c.vocab_size, h], false, false);
    b.push(format!("{prefix}embeddings.position_embeddings.weight"), vec![c.max_position_embeddings, h], false, false);
    b.push(format!("{prefix}embeddings.token_type_embeddings.weight"), vec![c.type_vocab_size, h], false, false);
    b.norm(&format!("{prefix}embeddings.LayerNorm"), h);
    for l in 0..c.num_hidden_layers {
        let lp = format!("{prefix}encoder.layer.{l}");
        let mut attention = |kind: &str| {
            b.linear(&format!("{lp}.{kind}.self.query"), h, h);
            b.linear(&format!("{lp}.{kind}.self.key"), h, h);
            b.linear(&format!("{lp}.{kind}.self.value"), h, h);
            b.linear(&format!("{lp}.{kind}.output.dense"), h, h);
            b.norm(&format!("{lp}.{kind}.output.LayerNorm"), h);
        };
        attention("attention");
        if cross {
            attention("crossattention");
        }
        b.linear(&format!("{lp}.intermediate.dense"), c.intermediate_size, h);
        b.linear(&format!("{lp}.output.dense"), h, c.intermediate_size);
        b.norm(&format!("{lp}.output.LayerNorm"), h);
    }
    if pooler {
        b.push(format!("{prefix}pooler.dense.weight"), vec![h, h], false, true);
        b.push(format!("{prefix}pooler.dense.bias"), vec![h], true, true);
    }
}

impl ParamTable {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut b = Builder { entries: Vec::new(), index: HashMap::new(), offset: 0 };
        let dec_prefix = cfg.decoder_prefix();
        bert_stack(&mut b, "encoder.", &cfg.encoder, false, true);
        if cfg.tie_encoder_decoder {
            // Decoder BERT = encoder BERT, except the cross-attention, which the encoder lacks.
            let mut dec = Builder { entries: Vec::new(), index: HashMap::new(), offset: b.offset };
            bert_stack(&mut dec, &dec_prefix, &cfg.decoder, true, false);
            for e in dec.entries {
                let shared = e.name.replacen(&dec_prefix, "encoder.", 1);
                if e.name.contains(".crossattention.") {
                    b.push(e.name, e.shape, e.no_decay, e.frozen);
                } else {
                    b.alias(e.name, &shared);
                }
            }
        } else {
            bert_stack(&mut b, &dec_prefix, &cfg.decoder, true, false);
        }
        let h = cfg.decoder.hidden_size;
        let head = cfg.decoder.family.head();
        b.linear(&format!("decoder.{}", head.dense), h, h);
        b.norm(&format!("decoder.{}", head.norm), h);
        b.push(format!("decoder.{}", head.bias), vec![cfg.decoder.vocab_size], true, false);
        ParamTable { entries: b.entries, index: b.index, storage_len: b.offset }
    }

    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// Entries that own storage (no aliases), in layout order.
    pub fn owned(&self) -> impl Iterator<Item = &ParamEntry> {
        self.entries.iter().filter(|e| e.alias_of.is_none())
    }

    fn range(&self, name: &str) -> Range<usize> {
        self.get(name).unwrap_or_else(|| panic!("parameter table lacks `{name}`")).range()
    }

    fn linear(&self, prefix: &str) -> LinearView {
        let e = self.get(&format!("{prefix}.weight")).unwrap_or_else(|| panic!("no {prefix}.weight"));
        LinearView { w: e.range(), b: self.range(&format!("{prefix}.bias")), out_dim: e.shape[0], in_dim: e.shape[1] }
    }

    fn norm(&self, prefix: &str) -> NormView {
        NormView { gamma: self.range(&format!("{prefix}.weight")), beta: self.range(&format!("{prefix}.bias")) }
    }

    fn attention(&self, prefix: &str) -> AttentionView {
        AttentionView {
            q: self.linear(&format!("{prefix}.self.query")),
            k: self.linear(&format!("{prefix}.self.key")),
            v: self.linear(&format!("{prefix}.self.value")),
            out: self.linear(&format!("{prefix}.output.dense")),
            norm: self.norm(&format!("{prefix}.output.LayerNorm")),
        }
    }

    fn stack(&self, prefix: &str, cfg: &BertConfig, cross: bool) -> StackView {
        let position = self.range(&format!("{prefix}embeddings.position_embeddings.weight"));
        let first_row = (position.start + cfg.position_offset() * cfg.hidden_size).min(position.end);
        StackView {
            embeddings: EmbeddingsView {
                word: self.range(&format!("{prefix}embeddings.word_embeddings.weight")),
                position_rows: first_row..position.end,
                position,
                token_type: self.range(&format!("{prefix}embeddings.token_type_embeddings.weight")),
                norm: self.norm(&format!("{prefix}embeddings.LayerNorm")),
            },
            layers: (0..cfg.num_hidden_layers)
                .map(|l| {
                    let lp = format!("{prefix}encoder.layer.{l}");
                    LayerView {
                        self_attn: self.attention(&format!("{lp}.attention")),
                        cross_attn: cross.then(|| self.attention(&format!("{lp}.crossattention"))),
                        inter: self.linear(&format!("{lp}.intermediate.dense")),
                        output: self.linear(&format!("{lp}.output.dense")),
                        norm: self.norm(&format!("{lp}.output.LayerNorm")),
                    }
                })
                .collect(),
        }
    }

    pub fn view(&self, cfg: &ModelConfig) -> ModelView {
        let head = cfg.decoder.family.head();
        ModelView {
            encoder: self.stack("encoder.", &cfg.encoder, false),
            decoder: self.stack(&cfg.decoder_prefix(), &cfg.decoder, true),
            lm_head: LmHeadView {
                transform: self.linear(&format!("decoder.{}", head.dense)),
                norm: self.norm(&format!("decoder.{}", head.norm)),
                bias: self.range(&format!("decoder.{}", head.bias)),
            },
        }
    }
}
