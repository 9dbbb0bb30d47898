//! Checks made before step 1 against the bert2bert failures that cost transformers users most
//! (its issue tracker): a decoder that starts from a token training never used, labels not
//! masked or shifted twice, rows with nothing in them, and cross-attention left at zero. Each
//! makes a model that trains without error and then emits the same text for every input; here
//! each is an error that names what is wrong, before any compute is spent.

use std::path::Path;

use kernels::IGNORE_INDEX;

use crate::config::ModelConfig;
use crate::data::{Batch, Special};
use crate::error::{Error, Result};
use crate::params::ParamTable;

/// The model's special ids are the tokenizer's: training frames every target as
/// `[CLS] target` -> `target [SEP]` and pads with `[PAD]`; generation starts from
/// `decoder_start_token_id` and stops at `eos_token_id`. A mismatch trains one protocol and
/// decodes another.
pub fn check_special_ids(cfg: &ModelConfig, special: Special, config_file: &Path) -> Result<()> {
    for (key, model, tokenizer, token) in [
        ("decoder_start_token_id", cfg.decoder_start_token_id, special.cls, "[CLS]"),
        ("pad_token_id", cfg.pad_token_id, special.pad, "[PAD]"),
        ("eos_token_id", cfg.eos_token_id, special.sep, "[SEP]"),
    ] {
        if model != tokenizer {
            return Err(Error::input(
                config_file,
                format!(
                    "`{key}` is {model} but the tokenizer's {token} is {tokenizer}: training and generation would disagree"
                ),
            ));
        }
    }
    Ok(())
}

/// Every id the tokenizer can produce has a row in both embedding tables: a larger tokenizer
/// would index past them.
pub fn check_tokenizer_fits(cfg: &ModelConfig, tok: &crate::tokenizer::Tokenizer) -> Result<()> {
    let (source, target) = tok.vocab_sizes();
    check_vocab_fits(cfg, (source, tok.source_origin()), (target, tok.target_origin()))
}

/// [`check_tokenizer_fits`] over the sizes: the encoder's tokenizer against the encoder's
/// `vocab_size`, the decoder's against the decoder's, each error naming its tokenizer file.
pub fn check_vocab_fits(cfg: &ModelConfig, source: (usize, &Path), target: (usize, &Path)) -> Result<()> {
    for (side, vocab, (tokens, file)) in
        [("encoder", cfg.encoder.vocab_size, source), ("decoder", cfg.decoder.vocab_size, target)]
    {
        if tokens > vocab {
            return Err(Error::input(
                file,
                format!(
                    "the tokenizer has {tokens} tokens but the {side}'s `vocab_size` is {vocab}: it does not fit the model"
                ),
            ));
        }
    }
    Ok(())
}

/// One batch as training feeds it: every row has a real source token and a label; the decoder
/// input is `[CLS]` then the labels shifted right once (not twice, not zero times); positions
/// past a row's target are ignored by the loss; no counted label is `[PAD]`. `what` names the
/// batch in the error (e.g. the data file).
pub fn check_batch(batch: &Batch, special: Special, what: &Path) -> Result<()> {
    let bad = |row: usize, msg: String| Err(Error::input(what, format!("batch row {row}: {msg}")));
    for r in 0..batch.batch {
        let mask = &batch.src_mask[r * batch.src_len..(r + 1) * batch.src_len];
        if !mask.iter().any(|&m| m > 0.0) {
            return bad(r, "the source is all padding".into());
        }
        let dec = &batch.dec_ids[r * batch.tgt_len..(r + 1) * batch.tgt_len];
        let labels = &batch.labels[r * batch.tgt_len..(r + 1) * batch.tgt_len];
        let counted = labels.iter().take_while(|&&l| l != IGNORE_INDEX).count();
        if counted == 0 {
            return bad(r, "no label is counted by the loss (the target is all padding)".into());
        }
        if let Some(t) = labels[counted..].iter().position(|&l| l != IGNORE_INDEX) {
            return bad(r, format!("label {} after the padding starts is not masked", counted + t));
        }
        if let Some(t) = labels[..counted].iter().position(|&l| l == special.pad) {
            return bad(r, format!("label {t} is [PAD] ({}) and counted: labels are not masked", special.pad));
        }
        if dec.first() != Some(&special.cls) {
            return bad(r, format!("the decoder input starts with {:?}, not [CLS] ({})", dec.first(), special.cls));
        }
        if let Some(t) = (1..counted).find(|&t| dec[t] != labels[t - 1]) {
            return bad(
                r,
                format!("decoder input {t} is not label {}: labels must be shifted right exactly once", t - 1),
            );
        }
    }
    Ok(())
}

/// Every cross-attention weight matrix holds finite values with some spread. All zeros (or
/// all one value) is what an encoder-decoder gets when its cross-attention was never
/// initialised: the decoder then cannot see the source. `what` names the checkpoint.
pub fn check_cross_attention(table: &ParamTable, params: &[f32], what: &Path) -> Result<()> {
    for e in table.owned().filter(|e| e.name.contains(".crossattention.") && e.name.ends_with(".weight")) {
        if e.shape.len() != 2 {
            continue; // LayerNorm weights are ones by design.
        }
        let values = &params[e.range()];
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::input(what, format!("`{}` holds {} at element {i}", e.name, values[i])));
        }
        let first = values.first().copied().unwrap_or(0.0);
        if values.iter().all(|&v| v == first) {
            return Err(Error::input(
                what,
                format!("`{}` is {first} everywhere: cross-attention is not initialised", e.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    const SPECIAL: Special = Special { cls: 2, sep: 3, pad: 0 };

    fn model_config() -> ModelConfig {
        let bert = testing::bert_config();
        let v = serde_json::json!({
            "encoder": bert.clone(), "decoder": bert, "decoder_start_token_id": 1, "pad_token_id": 0, "eos_token_id": 2
        });
        ModelConfig::from_value(&v, Path::new("config.json")).unwrap()
    }

    fn batch() -> Batch {
        Batch::new(&[vec![7, 8, 9], vec![7]], &[vec![10, 11, 12], vec![13]], SPECIAL, 16, 16)
    }

    fn refused(r: Result<()>, want: &str) {
        let e = r.expect_err(want).to_string();
        assert!(e.contains(want), "{e}");
    }

    #[test]
    fn a_well_formed_batch_passes_and_each_classic_mistake_is_named() {
        let p = Path::new("train.jsonl");
        check_batch(&batch(), SPECIAL, p).unwrap();
        // Labels shifted twice: the decoder input runs two ahead.
        let mut b = batch();
        b.dec_ids[1..4].copy_from_slice(&[11, 12, 3]);
        refused(check_batch(&b, SPECIAL, p), "shifted right exactly once");
        // Pad not masked: the shorter row's padding counted as [PAD] labels.
        let mut b = batch();
        let row = b.tgt_len;
        b.labels[row + 2..2 * row].fill(SPECIAL.pad);
        refused(check_batch(&b, SPECIAL, p), "labels are not masked");
        // A masked position followed by counted ones.
        let mut b = batch();
        b.labels[row + 3] = 13;
        refused(check_batch(&b, SPECIAL, p), "after the padding starts is not masked");
        // No start token.
        let mut b = batch();
        b.dec_ids[0] = 10;
        refused(check_batch(&b, SPECIAL, p), "not [CLS]");
        // A row of nothing.
        let mut b = batch();
        b.src_mask[b.src_len..].fill(0.0);
        refused(check_batch(&b, SPECIAL, p), "row 1: the source is all padding");
        let mut b = batch();
        b.labels[row..].fill(IGNORE_INDEX);
        refused(check_batch(&b, SPECIAL, p), "row 1: no label is counted");
    }

    #[test]
    fn special_ids_must_match_the_tokenizer() {
        let cfg = model_config();
        let special = Special { cls: cfg.decoder_start_token_id, sep: cfg.eos_token_id, pad: cfg.pad_token_id };
        let p = Path::new("config.json");
        check_special_ids(&cfg, special, p).unwrap();
        refused(check_special_ids(&cfg, Special { cls: special.cls + 1, ..special }, p), "`decoder_start_token_id`");
        refused(check_special_ids(&cfg, Special { pad: special.pad + 1, ..special }, p), "`pad_token_id`");
        refused(check_special_ids(&cfg, Special { sep: special.sep + 1, ..special }, p), "`eos_token_id`");
    }

    #[test]
    fn a_tokenizer_larger_than_either_vocabulary_is_refused() {
        let cfg = model_config();
        let p = Path::new("tokenizer.json");
        let fits = |s: usize, t: usize| check_vocab_fits(&cfg, (s, p), (t, Path::new("decoder_tokenizer.json")));
        fits(cfg.encoder.vocab_size, cfg.decoder.vocab_size).unwrap();
        refused(fits(cfg.encoder.vocab_size + 1, 1), "does not fit the model");
        let e = fits(1, cfg.decoder.vocab_size + 1).unwrap_err().to_string();
        assert!(e.starts_with("decoder_tokenizer.json: ") && e.contains("decoder's `vocab_size`"), "{e}");
    }

    #[test]
    fn zero_or_nan_cross_attention_is_refused_naming_the_tensor() {
        let cfg = model_config();
        let table = ParamTable::new(&cfg);
        let mut params: Vec<f32> = (0..table.storage_len).map(|i| kernels::rng::normal(5, i as u64)).collect();
        let p = Path::new("b2b");
        check_cross_attention(&table, &params, p).unwrap();
        let e = table.entries.iter().find(|e| e.name.ends_with("layer.1.crossattention.self.key.weight")).unwrap();
        params[e.range()].fill(0.0);
        refused(check_cross_attention(&table, &params, p), "layer.1.crossattention.self.key.weight` is 0 everywhere");
        params[e.range()][3] = f32::NAN;
        refused(check_cross_attention(&table, &params, p), "holds NaN at element 3");
    }
}
