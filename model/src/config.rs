//! Hugging Face configs: BertConfig in, EncoderDecoderConfig out (and back in).

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// The BertConfig fields the model uses. `raw` keeps every other key so a saved config
/// round-trips what the user gave us.
#[derive(Clone, Debug)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub initializer_range: f32,
    pub pad_token_id: i32,
    pub raw: Map<String, Value>,
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parse an HF BertConfig object; `file` only names the source in errors.
    pub fn from_value(v: &Value, file: &Path) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::input(file, "config is not a JSON object"))?;
        let usize_key = |key: &str| -> Result<usize> {
            let val = obj.get(key).ok_or_else(|| Error::input(file, format!("missing config key `{key}`")))?;
            val.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| Error::input(file, format!("config key `{key}` must be a positive integer, got {val}")))
        };
        let f32_key = |key: &str, default: Option<f32>| -> Result<f32> {
            match obj.get(key) {
                None => default.ok_or_else(|| Error::input(file, format!("missing config key `{key}`"))),
                Some(val) => val
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| Error::input(file, format!("config key `{key}` must be a number, got {val}"))),
            }
        };
        if let Some(act) = obj.get("hidden_act")
            && act.as_str() != Some("gelu")
        {
            return Err(Error::input(
                file,
                format!("config key `hidden_act` is {act}; only \"gelu\" (exact erf GELU) is supported"),
            ));
        }
        if let Some(pos) = obj.get("position_embedding_type")
            && pos.as_str() != Some("absolute")
        {
            return Err(Error::input(
                file,
                format!("config key `position_embedding_type` is {pos}; only \"absolute\" is supported"),
            ));
        }
        let cfg = BertConfig {
            vocab_size: usize_key("vocab_size")?,
            hidden_size: usize_key("hidden_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads: usize_key("num_attention_heads")?,
            intermediate_size: usize_key("intermediate_size")?,
            max_position_embeddings: usize_key("max_position_embeddings")?,
            type_vocab_size: usize_key("type_vocab_size")?,
            layer_norm_eps: f32_key("layer_norm_eps", Some(1e-12))?,
            hidden_dropout_prob: f32_key("hidden_dropout_prob", Some(0.1))?,
            attention_probs_dropout_prob: f32_key("attention_probs_dropout_prob", Some(0.1))?,
            initializer_range: f32_key("initializer_range", Some(0.02))?,
            pad_token_id: obj.get("pad_token_id").and_then(Value::as_i64).unwrap_or(0) as i32,
            raw: obj.clone(),
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::input(
                file,
                format!(
                    "config key `hidden_size` ({}) is not a multiple of `num_attention_heads` ({})",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, path)
    }

    /// The config as HF writes it for the encoder (`decoder=false`) or the decoder side.
    pub fn to_value(&self, decoder: bool) -> Value {
        let mut m = self.raw.clone();
        m.remove("_name_or_path");
        m.insert("model_type".into(), json!("bert"));
        m.insert("architectures".into(), json!([if decoder { "BertLMHeadModel" } else { "BertModel" }]));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert("num_attention_heads".into(), json!(self.num_attention_heads));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        m.insert("type_vocab_size".into(), json!(self.type_vocab_size));
        // Keep the user's exact value (1e-12 would print as 9.99e-13 through f32).
        if !m.contains_key("layer_norm_eps") {
            m.insert("layer_norm_eps".into(), json!(self.layer_norm_eps as f64));
        }
        m.insert("hidden_act".into(), json!("gelu"));
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
        m.insert("is_decoder".into(), json!(decoder));
        m.insert("add_cross_attention".into(), json!(decoder));
        m.insert("tie_word_embeddings".into(), json!(true));
        Value::Object(m)
    }
}

/// Which parts of the model start from BERT and whether encoder and decoder share weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Bert2Bert,
    BertShare,
    Bert2Rnd,
    Rnd2Bert,
    Rnd2Rnd,
}

impl Variant {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "bert2bert" => Variant::Bert2Bert,
            "bertshare" => Variant::BertShare,
            "bert2rnd" => Variant::Bert2Rnd,
            "rnd2bert" => Variant::Rnd2Bert,
            "rnd2rnd" => Variant::Rnd2Rnd,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Bert2Bert => "bert2bert",
            Variant::BertShare => "bertshare",
            Variant::Bert2Rnd => "bert2rnd",
            Variant::Rnd2Bert => "rnd2bert",
            Variant::Rnd2Rnd => "rnd2rnd",
        }
    }
    pub fn shares_weights(self) -> bool {
        self == Variant::BertShare
    }
    pub fn encoder_from_bert(self) -> bool {
        matches!(self, Variant::Bert2Bert | Variant::BertShare | Variant::Bert2Rnd)
    }
    pub fn decoder_from_bert(self) -> bool {
        matches!(self, Variant::Bert2Bert | Variant::BertShare | Variant::Rnd2Bert)
    }
}

/// An EncoderDecoderConfig of two BERTs.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub encoder: BertConfig,
    pub decoder: BertConfig,
    /// Encoder and decoder share their BERT weights (bertShare; HF `tie_encoder_decoder`).
    pub tie_encoder_decoder: bool,
    pub decoder_start_token_id: i32,
    pub pad_token_id: i32,
    pub eos_token_id: i32,
}

impl ModelConfig {
    pub fn to_value(&self) -> Value {
        json!({
            "architectures": ["EncoderDecoderModel"],
            "model_type": "encoder-decoder",
            "is_encoder_decoder": true,
            "encoder": self.encoder.to_value(false),
            "decoder": self.decoder.to_value(true),
            "tie_encoder_decoder": self.tie_encoder_decoder,
            "decoder_start_token_id": self.decoder_start_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "vocab_size": self.decoder.vocab_size,
        })
    }

    pub fn from_value(v: &Value, file: &Path) -> Result<Self> {
        let sub = |key: &str| -> Result<BertConfig> {
            let val = v.get(key).ok_or_else(|| Error::input(file, format!("missing config key `{key}`")))?;
            BertConfig::from_value(val, file).map_err(|e| match e {
                Error::Input { file, msg } => Error::Input { file, msg: format!("in `{key}`: {msg}") },
                other => other,
            })
        };
        let int_key = |key: &str| -> Result<i32> {
            v.get(key)
                .and_then(Value::as_i64)
                .map(|x| x as i32)
                .ok_or_else(|| Error::input(file, format!("missing or non-integer config key `{key}`")))
        };
        let cfg = ModelConfig {
            encoder: sub("encoder")?,
            decoder: sub("decoder")?,
            tie_encoder_decoder: v.get("tie_encoder_decoder").and_then(Value::as_bool).unwrap_or(false),
            decoder_start_token_id: int_key("decoder_start_token_id")?,
            pad_token_id: int_key("pad_token_id")?,
            eos_token_id: int_key("eos_token_id")?,
        };
        if cfg.tie_encoder_decoder {
            let (e, d) = (&cfg.encoder, &cfg.decoder);
            let same = (
                e.vocab_size,
                e.hidden_size,
                e.num_hidden_layers,
                e.num_attention_heads,
                e.intermediate_size,
                e.max_position_embeddings,
                e.type_vocab_size,
            ) == (
                d.vocab_size,
                d.hidden_size,
                d.num_hidden_layers,
                d.num_attention_heads,
                d.intermediate_size,
                d.max_position_embeddings,
                d.type_vocab_size,
            );
            if !same {
                return Err(Error::input(
                    file,
                    "`tie_encoder_decoder` is true but the encoder and decoder configs differ in shape",
                ));
            }
        }
        if cfg.encoder.hidden_size != cfg.decoder.hidden_size {
            return Err(Error::input(
                file,
                "encoder and decoder `hidden_size` differ; cross-attention needs them equal",
            ));
        }
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, path)
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::input(path, format!("invalid JSON: {e}")))
}
