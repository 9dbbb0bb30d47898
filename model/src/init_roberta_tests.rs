//! Warm starts from RoBERTa checkpoints as the Hub has them (RobertaForMaskedLM: the stack under
//! `roberta.`, the head as `lm_head.*`, the tied projection stored too), and the round trip of
//! what they build through our model directory.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use crate::checkpoint::tests::{randn, tiny_bert_json, write_bert_dir};
use crate::checkpoint::{load_model_dir, save_model_dir, write_tensors};
use crate::config::{Family, Variant};
use crate::data::Special;
use crate::init::warm_start_with_report;
use crate::testing::with_keys;

/// RoBERTa's specials: <s> 0, <pad> 1, </s> 2.
const SP: Special = Special { cls: 0, sep: 2, pad: 1 };

fn roberta_json() -> serde_json::Value {
    with_keys(
        tiny_bert_json(0.05),
        json!({"model_type": "roberta", "architectures": ["RobertaForMaskedLM"], "type_vocab_size": 1,
               "max_position_embeddings": 18, "bos_token_id": 0, "eos_token_id": 2, "layer_norm_eps": 1e-5}),
    )
}

/// A RobertaForMaskedLM directory: the stack (from `write_bert_dir`) plus the MLM head, with
/// the tied `lm_head.decoder.weight` stored as transformers may store it.
fn write_roberta_mlm(dir: &Path, seed: u64) -> HashMap<String, Vec<f32>> {
    let cfg = roberta_json();
    let mut values = write_bert_dir(dir, &cfg, seed, "roberta.");
    // Rewrite with the head added: read back what write_bert_dir wrote and append.
    let mut list = crate::checkpoint::read_tensors(&dir.join("model.safetensors")).unwrap();
    let (h, v) = (8, 50);
    for (name, shape) in [
        ("lm_head.dense.weight", vec![h, h]),
        ("lm_head.dense.bias", vec![h]),
        ("lm_head.layer_norm.weight", vec![h]),
        ("lm_head.layer_norm.bias", vec![h]),
        ("lm_head.bias", vec![v]),
        ("lm_head.decoder.weight", vec![v, h]),
    ] {
        let vals = randn(seed ^ name.len() as u64 ^ 0x5eed, shape.iter().product());
        values.insert(name.to_string(), vals.clone());
        list.push((name.to_string(), shape, vals));
    }
    let refs: Vec<(String, Vec<usize>, &[f32])> = list.iter().map(|(n, s, v)| (n.clone(), s.clone(), &v[..])).collect();
    write_tensors(&dir.join("model.safetensors"), &refs).unwrap();
    values
}

#[test]
fn roberta2roberta_takes_the_stack_and_the_head_by_their_names() {
    let d = tempfile::tempdir().unwrap();
    let values = write_roberta_mlm(d.path(), 3);
    let (ck, report) = warm_start_with_report(d.path(), None, Variant::Bert2Bert, SP, 7).unwrap();
    assert_eq!((ck.config.encoder.family, ck.config.decoder.family), (Family::Roberta, Family::Roberta));
    let get = |n: &str| &ck.params[ck.table.get(n).unwrap_or_else(|| panic!("no {n}")).range()];
    for (ours, theirs) in [
        ("encoder.encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.self.query.weight"),
        ("decoder.roberta.encoder.layer.0.output.dense.bias", "encoder.layer.0.output.dense.bias"),
        ("decoder.roberta.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
        ("decoder.lm_head.dense.weight", "lm_head.dense.weight"),
        ("decoder.lm_head.layer_norm.bias", "lm_head.layer_norm.bias"),
        ("decoder.lm_head.bias", "lm_head.bias"),
    ] {
        assert_eq!(get(ours), &values[theirs][..], "{ours}");
    }
    assert!(ck.table.get("decoder.bert.embeddings.word_embeddings.weight").is_none());
    assert!(ck.table.get("decoder.cls.predictions.bias").is_none());
    // Cross-attention is new; the tied projection and the position_ids buffer are not ours.
    assert!(report.random.iter().all(|n| n.contains(".crossattention.")), "{:?}", report.random);
    assert!(report.ignored.iter().any(|n| n.ends_with("lm_head.decoder.weight")), "{:?}", report.ignored);
    assert_eq!((ck.config.decoder_start_token_id, ck.config.eos_token_id, ck.config.pad_token_id), (0, 2, 1));

    let out = tempfile::tempdir().unwrap();
    save_model_dir(out.path(), &ck, None).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["decoder"]["architectures"][0], "RobertaForCausalLM");
    assert_eq!(cfg["encoder"]["model_type"], "roberta");
    let back = load_model_dir(out.path()).unwrap();
    assert_eq!(back.params, ck.params);
}

#[test]
fn robertashare_aliases_the_decoder_stack_to_the_encoder() {
    let d = tempfile::tempdir().unwrap();
    write_roberta_mlm(d.path(), 5);
    let (ck, _) = warm_start_with_report(d.path(), None, Variant::BertShare, SP, 7).unwrap();
    let e = ck.table.get("decoder.roberta.encoder.layer.1.intermediate.dense.weight").unwrap();
    let owner = &ck.table.entries[e.alias_of.expect("an alias")];
    assert_eq!(owner.name, "encoder.encoder.layer.1.intermediate.dense.weight");
    assert!(ck.table.get("decoder.roberta.encoder.layer.1.crossattention.self.key.weight").unwrap().alias_of.is_none());
}

#[test]
fn rnd2roberta_zeroes_the_padding_rows_of_words_and_positions() {
    let d = tempfile::tempdir().unwrap();
    write_roberta_mlm(d.path(), 9);
    let (ck, _) = warm_start_with_report(d.path(), None, Variant::Rnd2Bert, SP, 7).unwrap();
    let h = 8;
    for n in ["encoder.embeddings.word_embeddings.weight", "encoder.embeddings.position_embeddings.weight"] {
        let t = &ck.params[ck.table.get(n).unwrap().range()];
        assert!(t[h..2 * h].iter().all(|&x| x == 0.0), "{n}: row of pad id 1 is not zero");
        assert!(t[..h].iter().any(|&x| x != 0.0), "{n}: other rows are random");
    }
}

#[test]
fn a_bert_encoder_and_a_roberta_decoder_keep_their_own_names_and_vocabularies() {
    let (enc, dec) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_bert_dir(enc.path(), &with_keys(tiny_bert_json(0.05), json!({"vocab_size": 61})), 1, "bert.");
    write_roberta_mlm(dec.path(), 2);
    let (ck, _) = warm_start_with_report(enc.path(), Some(dec.path()), Variant::Bert2Bert, SP, 7).unwrap();
    assert_eq!((ck.config.encoder.vocab_size, ck.config.decoder.vocab_size), (61, 50));
    assert_eq!(ck.table.get("encoder.embeddings.word_embeddings.weight").unwrap().shape, vec![61, 8]);
    assert_eq!(ck.table.get("decoder.lm_head.bias").unwrap().shape, vec![50]);
    assert!(ck.table.get("decoder.roberta.encoder.layer.0.crossattention.self.query.weight").is_some());
}
