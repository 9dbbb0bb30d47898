//! Hugging Face configs: BertConfig in, EncoderDecoderConfig out (and back in).

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// The largest value each size key of a BertConfig may have: a few times the largest BERTs
/// (bert-large: 24 layers, hidden 1024; multilingual vocabularies: 250k), so a config.json
/// claiming a million layers fails before anything is allocated from it.
pub const SIZE_LIMITS: [(&str, usize); 7] = [
    ("vocab_size", 1 << 20),
    ("hidden_size", 16384),
    ("num_hidden_layers", 128),
    ("num_attention_heads", 256),
    ("intermediate_size", 65536),
    ("max_position_embeddings", 65536),
    ("type_vocab_size", 1024),
];

/// The most parameters an encoder-decoder may have (16 GiB in fp32): the per-key limits alone
/// would allow hundreds of billions.
pub const MAX_PARAMETERS: u64 = 1 << 32;

/// The pre-trained families a stack may come from, read from config.json's `model_type`. Both
/// are the same network (post-LN transformer, exact GELU, absolute positions, an MLM head of
/// dense + GELU + LayerNorm tied to the word embeddings); they differ in names and positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    #[default]
    Bert,
    Roberta,
}

/// The MLM/LM head's tensor names in one family, below `decoder.` (and in its pre-trained files).
#[derive(Clone, Copy, Debug)]
pub struct HeadNames {
    pub dense: &'static str,
    pub norm: &'static str,
    pub bias: &'static str,
    /// The tied projection (`<this>weight` is the word embeddings, `<this>bias` the head bias):
    /// never stored by us, skipped when a file has it.
    pub tied: &'static str,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
        }
    }
    /// The decoder stack's prefix below `decoder.` in an EncoderDecoderModel (`BertLMHeadModel.bert`,
    /// `RobertaForCausalLM.roberta`), and the prefix of the stack in *ForMaskedLM files.
    pub fn stack_prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert.",
            Family::Roberta => "roberta.",
        }
    }
    pub fn head(self) -> HeadNames {
        match self {
            Family::Bert => HeadNames {
                dense: "cls.predictions.transform.dense",
                norm: "cls.predictions.transform.LayerNorm",
                bias: "cls.predictions.bias",
                tied: "cls.predictions.decoder.",
            },
            Family::Roberta => HeadNames {
                dense: "lm_head.dense",
                norm: "lm_head.layer_norm",
                bias: "lm_head.bias",
                tied: "lm_head.decoder.",
            },
        }
    }
    /// transformers' class for the encoder (`decoder=false`) or the decoder with its LM head.
    pub fn architecture(self, decoder: bool) -> &'static str {
        match (self, decoder) {
            (Family::Bert, false) => "BertModel",
            (Family::Bert, true) => "BertLMHeadModel",
            (Family::Roberta, false) => "RobertaModel",
            (Family::Roberta, true) => "RobertaForCausalLM",
        }
    }
}

/// The BertConfig fields the model uses (a RobertaConfig has the same ones). `raw` keeps every
/// other key so a saved config round-trips what the user gave us.
#[derive(Clone, Debug)]
pub struct BertConfig {
    pub family: Family,
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

    /// The position id of a sequence's first token. BERT counts from 0; RoBERTa from
    /// `pad_token_id + 1`, as transformers' `create_position_ids_from_input_ids` does (our
    /// padding is on the right only, so the positions of real tokens are offset + index; padded
    /// rows never reach an unmasked output).
    pub fn position_offset(&self) -> usize {
        match self.family {
            Family::Bert => 0,
            Family::Roberta => usize::try_from(self.pad_token_id).map_or(0, |p| p + 1),
        }
    }

    /// The longest sequence the position table can embed (RoBERTa's 514 rows hold 512).
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.position_offset())
    }

    /// Parse an HF BertConfig object; `file` only names the source in errors. Sizes are checked
    /// against [`SIZE_LIMITS`] here, before anything is allocated from them. Messages name the
    /// key and the expected type, never a value from the file.
    pub fn from_value(v: &Value, file: &Path) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::input(file, "config is not a JSON object"))?;
        let usize_key = |key: &str| -> Result<usize> {
            let val = obj.get(key).ok_or_else(|| Error::input(file, format!("missing config key `{key}`")))?;
            let n = val.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                let kind = crate::data::json_kind(val);
                Error::input(file, format!("config key `{key}` must be a positive integer, found {kind}"))
            })?;
            let limit = SIZE_LIMITS.iter().find(|(k, _)| *k == key).map_or(u64::MAX, |&(_, l)| l as u64);
            if n > limit {
                return Err(Error::input(file, format!("config key `{key}` is above the limit of {limit}")));
            }
            Ok(n as usize)
        };
        let f32_key = |key: &str, default: Option<f32>| -> Result<f32> {
            match obj.get(key) {
                None => default.ok_or_else(|| Error::input(file, format!("missing config key `{key}`"))),
                Some(val) => val.as_f64().filter(|x| x.is_finite()).map(|x| x as f32).ok_or_else(|| {
                    let kind = crate::data::json_kind(val);
                    Error::input(file, format!("config key `{key}` must be a finite number, found {kind}"))
                }),
            }
        };
        let family = family_of(obj.get("model_type"), file)?;
        if let Some(act) = obj.get("hidden_act")
            && act.as_str() != Some("gelu")
        {
            return Err(Error::input(
                file,
                "config key `hidden_act`: only \"gelu\" (exact erf GELU) is supported".to_string(),
            ));
        }
        if let Some(pos) = obj.get("position_embedding_type")
            && pos.as_str() != Some("absolute")
        {
            return Err(Error::input(
                file,
                "config key `position_embedding_type`: only \"absolute\" is supported".to_string(),
            ));
        }
        let cfg = BertConfig {
            family,
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
        if cfg.family == Family::Roberta && cfg.pad_token_id < 0 {
            return Err(Error::input(file, "config key `pad_token_id`: RoBERTa positions need a non-negative pad id"));
        }
        if cfg.max_positions() == 0 {
            return Err(Error::input(
                file,
                "config key `max_position_embeddings` leaves no position after RoBERTa's offset (`pad_token_id` + 1)",
            ));
        }
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
        m.insert("model_type".into(), json!(self.family.model_type()));
        m.insert("architectures".into(), json!([self.family.architecture(decoder)]));
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

/// The family `model_type` names: absent is BERT (old BERT configs have no `model_type`). Another
/// family read as BERT would load (the tensor names can even match) and be a different model,
/// so it is refused by name when the value looks like a model type, else by its JSON kind:
/// config values are never echoed as they are.
fn family_of(kind: Option<&Value>, file: &Path) -> Result<Family> {
    match kind.map(|k| (k, k.as_str())) {
        None | Some((_, Some("bert"))) => Ok(Family::Bert),
        Some((_, Some("roberta"))) => Ok(Family::Roberta),
        Some((kind, s)) => {
            let plain =
                |k: &&str| k.len() <= 32 && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            let shown = match s.filter(plain) {
                Some(k) => format!("`{k}`"),
                None => crate::data::json_kind(kind).to_string(),
            };
            Err(Error::input(
                file,
                format!("config key `model_type` is {shown}: only `bert` and `roberta` checkpoints are supported"),
            ))
        }
    }
}

/// Which parts of the model start from BERT (a job-file value, so defined in `jobspec`).
pub use jobspec::Variant;

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
            if !same || e.family != d.family {
                return Err(Error::input(
                    file,
                    "`tie_encoder_decoder` is true but the encoder and decoder configs differ in shape or family",
                ));
            }
        }
        let params = cfg.parameter_estimate();
        if params > MAX_PARAMETERS {
            return Err(Error::input(
                file,
                format!(
                    "the encoder and decoder sizes (`num_hidden_layers`, `hidden_size`, `intermediate_size`, \
                     `vocab_size`) make about {params} parameters, above the limit of {MAX_PARAMETERS}"
                ),
            ));
        }
        for (key, id) in [
            ("decoder_start_token_id", cfg.decoder_start_token_id),
            ("pad_token_id", cfg.pad_token_id),
            ("eos_token_id", cfg.eos_token_id),
        ] {
            if usize::try_from(id).is_ok_and(|i| i >= cfg.decoder.vocab_size) || id < 0 {
                return Err(Error::input(file, format!("config key `{key}` is not an id below decoder `vocab_size`")));
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

    /// Where the decoder's stack sits in an EncoderDecoderModel: `decoder.bert.` or
    /// `decoder.roberta.`.
    pub fn decoder_prefix(&self) -> String {
        format!("decoder.{}", self.decoder.family.stack_prefix())
    }

    /// Parameters of both stacks, counted from the config without allocating (an upper bound:
    /// shared weights counted twice, cross-attention counted for the encoder too).
    pub fn parameter_estimate(&self) -> u64 {
        // u128: a BertConfig built in code need not respect SIZE_LIMITS, and this must not overflow.
        let one = |c: &BertConfig| -> u128 {
            let (h, i, l) = (c.hidden_size as u128, c.intermediate_size as u128, c.num_hidden_layers as u128);
            let rows = c.vocab_size as u128 + c.max_position_embeddings as u128 + c.type_vocab_size as u128;
            // Self- and cross-attention (8 h^2), the FFN (2 h i), biases and LayerNorms.
            let layer = 8 * h * h + 2 * h * i + 16 * h + i;
            // The pooler or the LM head's transform, embedding and head LayerNorms, the head bias.
            rows * h + l * layer + h * h + 8 * h + c.vocab_size as u128
        };
        u64::try_from(one(&self.encoder) + one(&self.decoder)).unwrap_or(u64::MAX)
    }

    /// The longest source and target the model can embed: the position tables less each
    /// family's offset (BERT's absolute positions start at 0, RoBERTa's after its pad id).
    pub fn max_lengths(&self) -> (usize, usize) {
        (self.encoder.max_positions(), self.decoder.max_positions())
    }
}

/// Before a model's parameter buffer is allocated: the weights must be large enough for the
/// `params` values its config describes (2 bytes each at the least: F16 or BF16), so a
/// config.json that claims a bigger model than its weights fails without the allocation.
/// `bytes` is the size of `weights`, or for a sharded checkpoint (`weights` its index) the
/// sum of its shards' sizes.
pub fn check_weights_size(config_file: &Path, weights: &Path, bytes: u64, params: usize) -> Result<()> {
    if bytes / 2 < params as u64 {
        return Err(Error::input(
            weights,
            format!(
                "{bytes} bytes of weights cannot hold the {params} parameters that {} describes",
                config_file.display()
            ),
        ));
    }
    Ok(())
}

/// The largest config.json read; real ones are a few KB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A JSON file of at most [`MAX_CONFIG_BYTES`], from a regular file.
pub fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::data::read_bounded(path, MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::input(path, format!("invalid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(edit: impl FnOnce(&mut Value)) -> Result<ModelConfig> {
        let bert = crate::testing::bert_config();
        let mut v = json!({
            "encoder": bert.clone(), "decoder": bert, "decoder_start_token_id": 1, "pad_token_id": 0,
            "eos_token_id": 2
        });
        edit(&mut v);
        ModelConfig::from_value(&v, Path::new("m/config.json"))
    }

    fn msg(r: Result<ModelConfig>) -> String {
        match r {
            Err(e @ Error::Input { .. }) => e.to_string(),
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn sizes_are_bounded_before_anything_is_allocated() {
        model(|_| {}).unwrap();
        let m = msg(model(|v| v["encoder"]["num_hidden_layers"] = json!(1_000_000)));
        assert_eq!(m, "m/config.json: in `encoder`: config key `num_hidden_layers` is above the limit of 128");
        for (key, limit) in SIZE_LIMITS {
            let m = msg(model(|v| v["decoder"][key] = json!(limit + 1)));
            assert!(m.contains(&format!("`{key}` is above the limit of {limit}")), "{m}");
        }
        // Every key at its limit: the parameter cap catches the product.
        let m = msg(model(|v| {
            for side in ["encoder", "decoder"] {
                v[side]["num_hidden_layers"] = json!(128);
                v[side]["hidden_size"] = json!(16384);
                v[side]["intermediate_size"] = json!(65536);
            }
        }));
        assert!(m.contains("above the limit of 4294967296"), "{m}");
        let m = msg(model(|v| v["eos_token_id"] = json!(1 << 20)));
        assert!(m.contains("`eos_token_id` is not an id below decoder `vocab_size`"), "{m}");
    }

    #[test]
    fn another_model_family_is_refused_by_name() {
        let m = msg(model(|v| v["decoder"]["model_type"] = json!("gpt2")));
        assert!(m.contains("in `decoder`: config key `model_type` is `gpt2`: only `bert` and `roberta`"), "{m}");
    }

    #[test]
    fn roberta_positions_start_after_the_pad_id() {
        let cfg = model(|v| {
            v["decoder"]["model_type"] = json!("roberta");
            v["decoder"]["pad_token_id"] = json!(1);
        })
        .unwrap();
        assert_eq!((cfg.encoder.family, cfg.decoder.family), (Family::Bert, Family::Roberta));
        assert_eq!((cfg.encoder.position_offset(), cfg.decoder.position_offset()), (0, 2));
        assert_eq!(cfg.max_lengths(), (64, 62));
        let saved = cfg.to_value();
        assert_eq!(saved["decoder"]["model_type"], "roberta");
        assert_eq!(saved["decoder"]["architectures"][0], "RobertaForCausalLM");
        assert_eq!(saved["encoder"]["architectures"][0], "BertModel");
        let m = msg(model(|v| {
            v["encoder"]["model_type"] = json!("roberta");
            v["encoder"]["pad_token_id"] = json!(63);
        }));
        assert!(m.contains("leaves no position after RoBERTa's offset"), "{m}");
    }

    #[test]
    fn errors_name_the_key_and_type_never_the_value() {
        for (key, value, want) in [
            ("vocab_size", json!("SECRET"), "`vocab_size` must be a positive integer, found a string"),
            ("hidden_act", json!("SECRET"), "`hidden_act`: only \"gelu\""),
            ("position_embedding_type", json!({"k": "SECRET"}), "`position_embedding_type`: only \"absolute\""),
            ("layer_norm_eps", json!(["SECRET"]), "`layer_norm_eps` must be a finite number, found an array"),
            ("model_type", json!("SECRET value"), "`model_type` is a string: only `bert` and `roberta`"),
        ] {
            let m = msg(model(|v| v["encoder"][key] = value));
            assert!(m.contains(want) && !m.contains("SECRET"), "{m}");
        }
    }
}
