//! Small, real inputs for tests in every crate: a tiny BERT directory (config, random weights,
//! a WordPiece tokenizer whose vocabulary covers the words below) and a few sentence pairs.

pub mod head_chunks;

use std::path::Path;

use serde_json::{Value, json};

use crate::checkpoint::{bert_shapes, write_tensors};
use crate::config::BertConfig;

pub const WORDS: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "and", "the", "lord", "said", "unto", "moses", "god", "he", "she",
    "was", "is", "to", "of", "in", "light", "earth", "day", "night", ",", ".", "##s", "##eth",
];

/// Pairs in the vocabulary above, KJV-like source and WEB-like target.
pub const PAIRS: &[(&str, &str)] = &[
    ("And the Lord said unto Moses", "The Lord said to Moses"),
    ("And God said", "God said"),
    ("the light of the day and the night of the earth", "light is day, night is earth."),
    ("And he said unto the Lord", "He said to the Lord."),
    ("she was the light of the earth", "she is the light of the earth."),
    ("And Moses said unto God", "Moses said to God."),
    ("the day of the Lord", "the day of the Lord."),
    ("And the night was", "The night is."),
];

/// tokenizer.json's `added_tokens` for special tokens whose ids are their indices in `names`.
fn added_specials(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({"id": i, "content": w, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect()
}

pub fn tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> =
        WORDS.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect();
    let added = added_specials(&WORDS[..5]);
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// The byte-level alphabet of GPT-2/RoBERTa tokenizers: every byte as one printable char
/// (printable Latin-1 bytes as themselves, the rest shifted past 255 in byte order).
fn byte_level_alphabet() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("Latin-1")
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("below the surrogates")
            }
        })
        .collect()
}

/// A tiny RoBERTa tokenizer.json (byte-level BPE): <s> 0, <pad> 1, </s> 2, <unk> 3, the 256
/// byte symbols, and a few merges so that `the` and ` the` are single tokens. Cased, as
/// RoBERTa's is. `ROBERTA_VOCAB` tokens in all.
pub fn roberta_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<s>", "<pad>", "</s>", "<unk>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for c in byte_level_alphabet() {
        let n = vocab.len();
        vocab.insert(c.to_string(), json!(n));
    }
    for t in ["th", "the", "\u{120}the"] {
        let n = vocab.len();
        vocab.insert(t.to_string(), json!(n));
    }
    let added = added_specials(&["<s>", "<pad>", "</s>", "<unk>"]);
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0], "trim_offsets": true, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["t h", "th e", "\u{120} the"]}
    })
}

/// Tokens in [`roberta_tokenizer_json`].
pub const ROBERTA_VOCAB: usize = 4 + 256 + 3;

/// The sizes of a tiny BERT config for tests. Tests pick their own (odd sizes catch layout
/// bugs that round ones hide), so only the JSON around them is shared.
#[derive(Clone, Copy, Debug)]
pub struct TinyBert {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub positions: usize,
}

impl TinyBert {
    /// The config.json keys every BERT config needs; a test adds any others it sets.
    pub fn json(&self) -> Value {
        json!({
            "vocab_size": self.vocab, "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "intermediate_size": self.intermediate,
            "max_position_embeddings": self.positions, "type_vocab_size": 2
        })
    }
}

/// `json`'s object with `extra`'s keys added (or replaced).
pub fn with_keys(mut json: Value, extra: Value) -> Value {
    if let (Some(obj), Value::Object(extra)) = (json.as_object_mut(), extra) {
        obj.extend(extra);
    }
    json
}

pub fn bert_config() -> Value {
    let sizes = TinyBert { vocab: WORDS.len(), hidden: 16, layers: 2, heads: 4, intermediate: 24, positions: 64 };
    with_keys(
        sizes.json(),
        json!({
            "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "initializer_range": 0.02
        }),
    )
}

/// Write a tiny random BERT directory; `break_tensor` is written with a wrong shape.
pub fn write_bert_dir(dir: &Path, seed: u64, break_tensor: Option<&str>) {
    std::fs::create_dir_all(dir).expect("create test dir");
    let cfg_v = bert_config();
    std::fs::write(dir.join("config.json"), cfg_v.to_string()).expect("write config");
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).expect("write tokenizer");
    let cfg = BertConfig::from_value(&cfg_v, dir).expect("valid test config");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = bert_shapes(&cfg)
        .into_iter()
        .enumerate()
        .map(|(k, (name, mut shape))| {
            if Some(name.as_str()) == break_tensor {
                shape[0] += 1;
            }
            let n: usize = shape.iter().product();
            let vals = (0..n as u64).map(|i| 0.2 * kernels::rng::normal(seed ^ k as u64, i)).collect();
            (name, shape, vals)
        })
        .collect();
    let refs: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
    write_tensors(&dir.join("model.safetensors"), &refs).expect("write weights");
}

/// The config.json of [`write_roberta_dir`]: the tiny BERT's sizes as a RoBERTa (positions
/// after pad + 1, one token type, the byte-level vocabulary).
pub fn roberta_config() -> Value {
    with_keys(
        bert_config(),
        json!({
            "architectures": ["RobertaForMaskedLM"], "model_type": "roberta", "vocab_size": ROBERTA_VOCAB,
            "max_position_embeddings": 66, "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0,
            "eos_token_id": 2, "layer_norm_eps": 1e-5
        }),
    )
}

/// Write a tiny random RoBERTa directory as RobertaForMaskedLM saves it: the stack under
/// `roberta.`, no pooler, the MLM head as `lm_head.*`, and [`roberta_tokenizer_json`].
pub fn write_roberta_dir(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).expect("create test dir");
    let cfg_v = roberta_config();
    std::fs::write(dir.join("config.json"), cfg_v.to_string()).expect("write config");
    std::fs::write(dir.join("tokenizer.json"), roberta_tokenizer_json().to_string()).expect("write tokenizer");
    let cfg = BertConfig::from_value(&cfg_v, dir).expect("valid test config");
    let h = cfg.hidden_size;
    let head = [
        ("lm_head.dense.weight".to_string(), vec![h, h]),
        ("lm_head.dense.bias".to_string(), vec![h]),
        ("lm_head.layer_norm.weight".to_string(), vec![h]),
        ("lm_head.layer_norm.bias".to_string(), vec![h]),
        ("lm_head.bias".to_string(), vec![cfg.vocab_size]),
    ];
    let stack = bert_shapes(&cfg)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("pooler."))
        .map(|(n, s)| (format!("roberta.{n}"), s));
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = stack
        .chain(head)
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let vals = (0..n as u64).map(|i| 0.2 * kernels::rng::normal(seed ^ (k as u64 + 1000), i)).collect();
            (name, shape, vals)
        })
        .collect();
    let refs: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
    write_tensors(&dir.join("model.safetensors"), &refs).expect("write weights");
}

/// `PAIRS` as JSONL lines, repeated `times` times.
pub fn write_pairs(path: &Path, times: usize) {
    let mut text = String::new();
    for _ in 0..times {
        for (s, t) in PAIRS {
            text.push_str(&json!({"source": s, "target": t}).to_string());
            text.push('\n');
        }
    }
    std::fs::write(path, text).expect("write pairs");
}

/// How far two parameter vectors of one table are apart, per tensor: the worst
/// `|a - b| / max(|a|, 1)` outside the attention key biases, the tensor it is in, and the worst
/// inside them. Key biases have an exactly zero true gradient, so AdamW turns their rounding
/// noise into lr-sized steps of random sign: equivalence tests compare them on their own, loosely.
pub struct ParamDiff {
    pub worst: f32,
    pub worst_name: String,
    pub worst_key_bias: f32,
}

pub fn param_diff(table: &crate::params::ParamTable, a: &[f32], b: &[f32]) -> ParamDiff {
    assert_eq!(a.len(), b.len(), "parameter vectors of different lengths");
    let mut diff = ParamDiff { worst: 0.0, worst_name: String::new(), worst_key_bias: 0.0 };
    for e in table.owned() {
        let r = e.range();
        let d = a[r.clone()].iter().zip(&b[r]).map(|(x, y)| (x - y).abs() / x.abs().max(1.0)).fold(0.0f32, f32::max);
        if e.name.contains(".self.key.bias") {
            diff.worst_key_bias = diff.worst_key_bias.max(d);
        } else if d > diff.worst {
            (diff.worst, diff.worst_name) = (d, e.name.clone());
        }
    }
    diff
}
