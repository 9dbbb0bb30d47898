//! Round trips and error messages of model directories and safetensors files.

use std::collections::HashSet;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::*;
use crate::testing::{TinyBert, with_keys};
use serde_json::json;

pub(crate) fn tiny_bert_json(init_range: f64) -> serde_json::Value {
    let sizes = TinyBert { vocab: 50, hidden: 8, layers: 2, heads: 2, intermediate: 12, positions: 16 };
    with_keys(sizes.json(), json!({"initializer_range": init_range, "pad_token_id": 1, "hidden_act": "gelu"}))
}

pub(crate) fn tiny_bert() -> BertConfig {
    BertConfig::from_value(&tiny_bert_json(0.02), Path::new("test")).unwrap()
}

pub(crate) fn randn(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64).map(|i| kernels::rng::normal(seed, i)).collect()
}

/// A BERT directory as the Hub has it: every stack tensor random (biases too, so copies are
/// visible), names under `prefix`, plus a position_ids buffer to be ignored.
pub(crate) fn write_bert_dir(
    dir: &Path,
    cfg: &serde_json::Value,
    seed: u64,
    prefix: &str,
) -> HashMap<String, Vec<f32>> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bert = BertConfig::from_value(cfg, Path::new("test")).unwrap();
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    for (i, (name, shape)) in bert_shapes(&bert).into_iter().enumerate() {
        values.insert(name, randn(seed + i as u64, shape.iter().product()));
    }
    let shapes: HashMap<String, Vec<usize>> = bert_shapes(&bert).into_iter().collect();
    let pos: Vec<f32> = (0..bert.max_position_embeddings).map(|i| i as f32).collect();
    let mut list: Vec<(String, Vec<usize>, &[f32])> =
        values.iter().map(|(n, v)| (format!("{prefix}{n}"), shapes[n].clone(), v.as_slice())).collect();
    list.push((format!("{prefix}embeddings.position_ids"), vec![1, pos.len()], &pos));
    write_tensors(&dir.join("model.safetensors"), &list).unwrap();
    values
}

pub(super) fn random_checkpoint(tie: bool, seed: u64) -> Checkpoint {
    let config = ModelConfig {
        encoder: tiny_bert(),
        decoder: tiny_bert(),
        tie_encoder_decoder: tie,
        decoder_start_token_id: 2,
        pad_token_id: 1,
        eos_token_id: 3,
    };
    let table = ParamTable::new(&config);
    let params = randn(seed, table.storage_len);
    Checkpoint { config, table, params }
}

fn t(name: &str, shape: &[usize], v: Vec<f32>) -> NamedTensor {
    (name.to_owned(), shape.to_vec(), v)
}

fn set_shape(ts: &mut [NamedTensor], name: &str, shape: &[usize]) {
    ts.iter_mut().filter(|x| x.0 == name).for_each(|x| x.1 = shape.to_vec());
}

pub(super) fn input_err<T>(r: Result<T>) -> String {
    match r {
        Err(e @ Error::Input { .. }) => e.to_string(),
        Err(e) => panic!("expected an input error, got {e:?}"),
        Ok(_) => panic!("expected an input error, got Ok"),
    }
}

#[test]
fn save_load_round_trip_both_ties() {
    let (_td, tok) = crate::tokenizer::tests::tiny_tokenizer();
    for tie in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        let ck = random_checkpoint(tie, 11 + tie as u64);
        save_model_dir(&dir, &ck, Some(&tok)).unwrap();
        let back = load_model_dir(&dir).unwrap();
        assert_eq!(back.params, ck.params);
        assert_eq!(back.config.to_value(), ck.config.to_value());
        assert_eq!(back.table.storage_len, ck.table.storage_len);
        let names: HashSet<String> =
            read_tensors(&dir.join("model.safetensors")).unwrap().into_iter().map(|t| t.0).collect();
        assert_eq!(names.len(), ck.table.entries.len(), "aliases are written too");
        assert!(names.contains("decoder.bert.encoder.layer.1.attention.self.key.weight"));
        assert!(!names.iter().any(|n| n.starts_with("decoder.cls.predictions.decoder")));
        let tj = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
        assert_eq!(tj, tok.to_json_string().unwrap());
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let perm = std::fs::metadata(dir.join("model.safetensors")).unwrap().permissions();
            assert_eq!(perm.mode() & 0o777, 0o644, "not the crate's 0600 tempfile mode");
        }
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["ck"], "no temp or old directory left behind");
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn checkpoint_save_replaces_only_our_own_directory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ck");
    let state = |tmp: &Path| write_synced(&tmp.join("state.bin"), b"s");
    save_model_dir_with(&dir, &random_checkpoint(false, 1), None, "job a", state).unwrap();
    // Siblings with similar names are not ours: none of them is touched.
    std::fs::create_dir_all(d.path().join("ck.tmp/junk")).unwrap();
    std::fs::write(d.path().join("ck.old"), b"mine").unwrap();
    std::fs::create_dir_all(d.path().join("ck.tmp.99.0.0/part")).unwrap();
    let ck = random_checkpoint(false, 2);
    save_model_dir_with(&dir, &ck, None, "job a", state).unwrap();
    assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);
    assert_eq!(listing(&dir), [WRITER_FILE, "config.json", "model.safetensors", "state.bin"]);
    assert_eq!(std::fs::read(d.path().join("ck.old")).unwrap(), b"mine");
    assert!(d.path().join("ck.tmp/junk").is_dir() && d.path().join("ck.tmp.99.0.0/part").is_dir());

    // A user's file inside the target: refused, named, and everything stays.
    std::fs::write(dir.join("notes.txt"), b"keep me").unwrap();
    let msg = input_err(save_model_dir_with(&dir, &random_checkpoint(false, 3), None, "job a", state));
    assert!(msg.contains("notes.txt") && msg.contains("refusing"), "{msg}");
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"keep me");
    assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);
    assert_eq!(listing(d.path()), ["ck", "ck.old", "ck.tmp", "ck.tmp.99.0.0"], "no temp dir left after a refusal");

    // A failed write (here: the extra files) removes its own temp directory.
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    let failing = |_: &Path| -> Result<()> { Err(Error::Other("disk full".into())) };
    let e = save_model_dir_with(&dir, &random_checkpoint(false, 4), None, "job a", failing).unwrap_err();
    assert!(e.to_string().contains("disk full"));
    assert_eq!(listing(d.path()), ["ck", "ck.old", "ck.tmp", "ck.tmp.99.0.0"]);
    assert_eq!(load_model_dir(&dir).unwrap().params, ck.params, "the old checkpoint is intact");
}

#[test]
fn init_saves_refuse_foreign_targets_and_never_delete_other_files() {
    let d = tempfile::tempdir().unwrap();
    // A plain file is never replaced, with or without force.
    let file = d.path().join("file");
    std::fs::write(&file, b"data").unwrap();
    for force in [false, true] {
        let msg = input_err(save_model_dir_opts(&file, &random_checkpoint(false, 1), None, force));
        assert!(msg.contains("not a directory") && msg.contains("file"), "{msg}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
    // A directory of other things: refused without force; with force our files go in beside.
    let thesis = d.path().join("x");
    std::fs::create_dir_all(thesis.join("thesis")).unwrap();
    std::fs::write(thesis.join("thesis/ch1.tex"), b"work").unwrap();
    let msg = input_err(save_model_dir_opts(&thesis, &random_checkpoint(false, 1), None, false));
    assert!(msg.contains("x: exists and is neither empty nor a model directory") && msg.contains("--force"), "{msg}");
    assert_eq!(listing(&thesis), ["thesis"]);
    let ck = random_checkpoint(false, 2);
    save_model_dir_opts(&thesis, &ck, None, true).unwrap();
    assert_eq!(std::fs::read(thesis.join("thesis/ch1.tex")).unwrap(), b"work");
    assert_eq!(listing(&thesis), ["config.json", "model.safetensors", "thesis"]);
    // Now a model directory: saving over it needs no force, and the user's files stay.
    let ck = random_checkpoint(true, 3);
    save_model_dir(&thesis, &ck, None).unwrap();
    assert_eq!(load_model_dir(&thesis).unwrap().params, ck.params);
    assert_eq!(listing(&thesis), ["config.json", "model.safetensors", "thesis"], "no temp files left");
    // An empty directory is fine.
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    save_model_dir(&empty, &ck, None).unwrap();
    assert_eq!(load_model_dir(&empty).unwrap().params, ck.params);
}

#[test]
fn stale_partials_are_removed_only_when_provably_ours() {
    let d = tempfile::tempdir().unwrap();
    let make = |name: &str, writer: Option<&str>, files: &[&str]| {
        let p = d.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        if let Some(w) = writer {
            std::fs::write(p.join(WRITER_FILE), w).unwrap();
        }
        for f in files {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        p
    };
    let killed = make("step-00000003.tmp.12.0.7", Some("me"), &["config.json", ".tmpAb12Cd", "state.bin"]);
    let old = make("step-00000002.old.12.1.7", Some("me"), &["config.json", "model.safetensors"]);
    let other_job = make("step-00000003.tmp.13.0.7", Some("someone else"), &["config.json"]);
    let no_marker = make("step-00000004.tmp.14.0.7", None, &["config.json"]);
    let user_file = make("step-00000005.tmp.15.0.7", Some("me"), &["config.json", "thesis.tex"]);
    let user_name = make("step-00000006.tmp.mine", Some("me"), &["config.json"]);
    let wrong_base = make("logs.tmp.16.0.7", Some("me"), &["config.json"]);
    let removed = remove_stale_partials(d.path(), |b| b.starts_with("step-"), |w| w == "me", &["state.bin"]).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(!killed.exists() && !old.exists());
    for kept in [&other_job, &no_marker, &user_file, &user_name, &wrong_base] {
        assert!(kept.join("config.json").exists(), "{} was touched", kept.display());
    }
    assert!(user_file.join("thesis.tex").exists());
}

#[test]
fn concurrent_saves_of_one_directory_both_land_whole() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ck");
    let cks = [random_checkpoint(false, 3), random_checkpoint(false, 4)];
    std::thread::scope(|s| {
        for ck in &cks {
            let dir = &dir;
            s.spawn(move || {
                for _ in 0..5 {
                    save_model_dir_with(dir, ck, None, "job a", |_| Ok(())).unwrap();
                }
            });
        }
    });
    let got = load_model_dir(&dir).unwrap().params;
    assert!(got == cks[0].params || got == cks[1].params, "the survivor is one writer's whole checkpoint");
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["ck"], "no temp or old directory left behind");
}

/// Rewrites `dir`'s model.safetensors after `edit` changes its (name, shape, values) list.
pub(crate) fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<NamedTensor>)) {
    let mut t = read_tensors(&dir.join("model.safetensors")).unwrap();
    edit(&mut t);
    let refs: Vec<_> = t.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
    write_tensors(&dir.join("model.safetensors"), &refs).unwrap();
}

#[test]
fn load_model_dir_errors_name_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ck");
    let ck = random_checkpoint(true, 5);
    save_model_dir(&dir, &ck, None).unwrap();
    // Ignorable extras and absent aliases are fine.
    rewrite(&dir, |ts| {
        ts.retain(|(n, _, _)| !n.starts_with("decoder.bert.embeddings."));
        ts.push(t("decoder.cls.predictions.decoder.weight", &[2], vec![1.0, 2.0]));
        ts.push(t("encoder.embeddings.position_ids", &[1], vec![0.0]));
    });
    assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);
    // Only the aliases present: the tied storage is still filled.
    rewrite(&dir, |t| t.retain(|(n, _, _)| !n.starts_with("encoder.encoder.layer.1.")));
    assert_eq!(load_model_dir(&dir).unwrap().params, ck.params);

    let w = "encoder.encoder.layer.0.attention.self.query.weight";
    rewrite(&dir, |ts| set_shape(ts, w, &[4, 16]));
    let msg = input_err(load_model_dir(&dir));
    assert!(msg.ends_with(&format!("model.safetensors: tensor `{w}` has shape [4, 16], expected [8, 8]")), "{msg}");
    // Gone under both of its names.
    rewrite(&dir, |t| t.retain(|x| !x.0.ends_with("encoder.layer.0.attention.self.query.weight")));
    assert!(input_err(load_model_dir(&dir)).ends_with(&format!("missing tensor `{w}`")));
    rewrite(&dir, |ts| ts.push(t("encoder.extra.weight", &[1], vec![1.0])));
    assert!(input_err(load_model_dir(&dir)).ends_with("unknown tensor `encoder.extra.weight`"));

    let mut cfg = ck.config.to_value();
    cfg["decoder"]["num_hidden_layers"] = json!(3);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    assert!(input_err(load_model_dir(&dir)).contains("encoder and decoder configs differ in shape"));
}

#[test]
fn load_bert_dir_normalises_names_and_checks_shapes() {
    let d = tempfile::tempdir().unwrap();
    let values = write_bert_dir(d.path(), &tiny_bert_json(0.02), 3, "bert.");
    let w = load_bert_dir(d.path()).unwrap();
    assert_eq!(w.tensors.len(), values.len());
    for (n, v) in &values {
        assert_eq!(&w.tensors[n].1, v, "{n}");
    }
    // TF-era LayerNorm names, half-precision storage, an MLM head and a wrong shape.
    let ln = values["embeddings.LayerNorm.weight"].clone();
    rewrite(d.path(), |ts| {
        ts.retain(|x| x.0 != "bert.embeddings.LayerNorm.weight");
        ts.push(t("bert.embeddings.LayerNorm.gamma", &[8], ln.clone()));
        ts.push(t("cls.predictions.transform.dense.weight", &[8, 8], randn(9, 64)));
        ts.push(t("cls.seq_relationship.weight", &[2, 8], randn(9, 16)));
    });
    let w = load_bert_dir(d.path()).unwrap();
    assert_eq!(w.tensors["embeddings.LayerNorm.weight"].1, ln);
    assert_eq!(w.tensors["cls.predictions.transform.dense.weight"].1, randn(9, 64));
    assert!(!w.tensors.contains_key("cls.seq_relationship.weight"));

    let name = "bert.encoder.layer.1.intermediate.dense.weight";
    rewrite(d.path(), |ts| set_shape(ts, name, &[8, 12]));
    let msg = input_err(load_bert_dir(d.path()));
    assert!(msg.ends_with(&format!("tensor `{name}` has shape [8, 12], expected [12, 8]")), "{msg}");
    rewrite(d.path(), |t| t.retain(|x| x.0 != name));
    assert!(input_err(load_bert_dir(d.path())).ends_with("missing tensor `encoder.layer.1.intermediate.dense.weight`"));
}

/// A file with raw little-endian tensors of any dtype.
pub(super) fn write_raw(path: &Path, items: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> =
        items.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn reads_half_floats_and_integer_ids() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("g.safetensors");
    let xs = randn(4, 6);
    let f16: Vec<u8> = xs.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let bf16: Vec<u8> = xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let ids: Vec<i64> = (0..6).map(|i| (kernels::rng::uniform(8, i) * 30000.0) as i64).collect();
    write_raw(
        &p,
        &[
            ("a", Dtype::F16, vec![2, 3], f16),
            ("b", Dtype::BF16, vec![6], bf16),
            ("ids", Dtype::I64, vec![3, 2], ids.iter().flat_map(|x| x.to_le_bytes()).collect()),
            ("big", Dtype::I64, vec![1], (1i64 << 40).to_le_bytes().to_vec()),
        ],
    );
    let t = read_tensors(&p).unwrap();
    assert_eq!(t.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    for (x, (a, b)) in xs.iter().zip(t[0].2.iter().zip(&t[1].2)) {
        assert!((x - a).abs() <= 1e-3 * x.abs().max(1.0) && (x - b).abs() <= 8e-3 * x.abs().max(1.0));
    }
    let (shape, got) = read_i32_tensor(&p, "ids").unwrap();
    assert_eq!((shape, got), (vec![3, 2], ids.iter().map(|&x| x as i32).collect::<Vec<_>>()));
    assert!(input_err(read_i32_tensor(&p, "big")).contains("beyond the i32 range"));
    assert!(input_err(read_i32_tensor(&p, "a")).contains("tensor `a` has dtype F16"));
    assert!(input_err(read_i32_tensor(&p, "nope")).ends_with("missing tensor `nope`"));
    std::fs::write(&p, b"garbage").unwrap();
    assert!(input_err(read_tensors(&p)).contains("not a valid safetensors file"));
}

/// A safetensors file laid out by hand: a one-byte tensor first, so every later tensor's data
/// starts at an odd address of the map (the crate's own writer would align them).
fn write_unaligned(path: &Path, items: &[(&str, &str, usize, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    header.insert("pad".into(), json!({"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}));
    let mut data = vec![0xAB];
    for (name, dtype, n, bytes) in items {
        let at = data.len();
        data.extend_from_slice(bytes);
        header.insert((*name).into(), json!({"dtype": dtype, "shape": [n], "data_offsets": [at, data.len()]}));
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn reads_tensors_whose_data_is_not_aligned() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("odd.safetensors");
    let xs = randn(11, 7);
    let ids32: Vec<i32> = (0..5).map(|i| (kernels::rng::uniform(12, i) * 2e9) as i32 - 1_000_000_000).collect();
    let ids64: Vec<i64> = (0..3).map(|i| (kernels::rng::uniform(13, i) * 2e9) as i64 - 1_000_000_000).collect();
    write_unaligned(
        &p,
        &[
            ("f", "F32", xs.len(), xs.iter().flat_map(|x| x.to_le_bytes()).collect()),
            ("i32", "I32", ids32.len(), ids32.iter().flat_map(|x| x.to_le_bytes()).collect()),
            ("i64", "I64", ids64.len(), ids64.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ],
    );
    let t = read_tensors(&p).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].1.clone(), t[0].2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
        (vec![7], xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    );
    assert_eq!(read_i32_tensor(&p, "i32").unwrap(), (vec![5], ids32));
    assert_eq!(read_i32_tensor(&p, "i64").unwrap(), (vec![3], ids64.iter().map(|&x| x as i32).collect()));
}
