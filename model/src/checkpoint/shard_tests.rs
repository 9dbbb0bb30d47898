//! Sharded checkpoints (model.safetensors.index.json), untrusted shard names, and directories
//! that hold only PyTorch weights.

use safetensors::tensor::Dtype;
use serde_json::json;

use super::shards::{INDEX, SINGLE, convert_command};
use super::tests::{input_err, random_checkpoint, tiny_bert_json, write_bert_dir, write_raw};
use super::*;

/// Writes `tensors` as one safetensors file, every value stored as `dtype` (F32 or BF16).
fn write_as(path: &Path, tensors: &[NamedTensor], dtype: Dtype) {
    let bytes = |v: &[f32]| -> Vec<u8> {
        match dtype {
            Dtype::BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    };
    let items: Vec<_> = tensors.iter().map(|(n, s, v)| (n.as_str(), dtype, s.clone(), bytes(v))).collect();
    write_raw(path, &items);
}

fn shard_name(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", k + 1)
}

/// Writes the index of `dir` from (tensor, shard) pairs, as transformers lays it out.
fn write_index(dir: &Path, entries: &[(String, String)]) {
    let map: serde_json::Map<String, serde_json::Value> = entries.iter().map(|(t, s)| (t.clone(), json!(s))).collect();
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(INDEX), index.to_string()).unwrap();
}

/// Deals `tensors` (sorted by name) round-robin into `n` shards of `dir` and writes the index;
/// returns its (tensor, shard) entries. Round-robin puts neighbours (a weight and its bias, an
/// encoder tensor and its decoder alias) in different files.
fn write_shards(dir: &Path, tensors: &[NamedTensor], n: usize, dtype: Dtype) -> Vec<(String, String)> {
    let mut groups: Vec<Vec<NamedTensor>> = vec![Vec::new(); n];
    let mut entries = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        groups[i % n].push(t.clone());
        entries.push((t.0.clone(), shard_name(i % n, n)));
    }
    for (k, g) in groups.iter().enumerate() {
        write_as(&dir.join(shard_name(k, n)), g, dtype);
    }
    write_index(dir, &entries);
    entries
}

/// A BERT directory in three BF16 shards (no model.safetensors); returns the tensors it holds
/// at full precision and the index entries.
fn sharded_bert(dir: &Path, seed: u64) -> (Vec<NamedTensor>, Vec<(String, String)>) {
    let values = write_bert_dir(dir, &tiny_bert_json(0.02), seed, "bert.");
    let tensors = read_tensors(&dir.join(SINGLE)).unwrap();
    assert_eq!(tensors.len(), values.len() + 1, "the stack and position_ids");
    std::fs::remove_file(dir.join(SINGLE)).unwrap();
    let entries = write_shards(dir, &tensors, 3, Dtype::BF16);
    (tensors, entries)
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

#[test]
fn a_sharded_bf16_bert_loads_as_the_same_weights_in_one_file() {
    let d = tempfile::tempdir().unwrap();
    let (one, sharded) = (d.path().join("one"), d.path().join("sharded"));
    let (tensors, _) = sharded_bert(&sharded, 3);
    std::fs::create_dir_all(&one).unwrap();
    std::fs::copy(sharded.join("config.json"), one.join("config.json")).unwrap();
    write_as(&one.join(SINGLE), &tensors, Dtype::BF16);

    let (a, b) = (load_bert_dir(&one).unwrap(), load_bert_dir(&sharded).unwrap());
    assert_eq!(b.tensors.len(), tensors.len() - 1, "position_ids is not loaded");
    let mut rounded_any = false;
    for (raw, shape, v) in tensors.iter().filter(|t| !t.0.ends_with("position_ids")) {
        let name = raw.strip_prefix("bert.").unwrap();
        assert_eq!(b.tensors[name], a.tensors[name], "{name}");
        assert_eq!(b.tensors[name], (shape.clone(), bf16_round(v)), "{name}");
        rounded_any |= bf16_round(v) != *v;
    }
    assert!(rounded_any, "the shards really hold bf16");
    // Every shard contributed: each one holds a required tensor.
    for k in 0..3 {
        let names = read_tensors(&sharded.join(shard_name(k, 3))).unwrap();
        assert!(names.iter().any(|t| t.0.contains(".layer.")), "shard {k}");
    }
}

#[test]
fn a_model_dir_split_into_shards_loads_the_identical_params() {
    for tie in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        let ck = random_checkpoint(tie, 21 + tie as u64);
        save_model_dir(&dir, &ck, None).unwrap();
        let mut tensors = read_tensors(&dir.join(SINGLE)).unwrap();
        std::fs::remove_file(dir.join(SINGLE)).unwrap();
        if tie {
            // Only the decoder's alias names of layer 1, in other shards than their neighbours:
            // the tied storage is filled across files.
            tensors.retain(|t| !t.0.starts_with("encoder.encoder.layer.1."));
        }
        write_shards(&dir, &tensors, 3, Dtype::F32);
        let back = load_model_dir(&dir).unwrap();
        assert_eq!(back.params, ck.params, "tie {tie}");
        assert_eq!(back.config.to_value(), ck.config.to_value());
    }
}

#[test]
fn the_size_check_counts_every_shard() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ck");
    let ck = random_checkpoint(false, 5);
    save_model_dir(&dir, &ck, None).unwrap();
    let tensors = read_tensors(&dir.join(SINGLE)).unwrap();
    std::fs::remove_file(dir.join(SINGLE)).unwrap();
    write_shards(&dir, &tensors, 2, Dtype::BF16);
    assert_eq!(load_model_dir(&dir).unwrap().params, bf16_round(&ck.params));
    // A config whose parameters need more bytes than the larger shard holds, but no more than
    // both together: past the size check, it fails on the first tensor of the wrong shape.
    let largest = (0..2).map(|k| std::fs::metadata(dir.join(shard_name(k, 2))).unwrap().len()).max().unwrap();
    let mut bigger = ck.config.clone();
    while ParamTable::new(&bigger).storage_len as u64 * 2 <= largest {
        bigger.decoder.vocab_size += 1;
    }
    let total: u64 = (0..2).map(|k| std::fs::metadata(dir.join(shard_name(k, 2))).unwrap().len()).sum();
    assert!(ParamTable::new(&bigger).storage_len as u64 * 2 <= total, "the test needs a config between the two");
    std::fs::write(dir.join("config.json"), bigger.to_value().to_string()).unwrap();
    let msg = input_err(load_model_dir(&dir));
    assert!(msg.contains("has shape") && !msg.contains("cannot hold"), "{msg}");

    let mut cfg = ck.config.to_value();
    cfg["decoder"]["vocab_size"] = json!(1 << 20);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let msg = input_err(load_model_dir(&dir));
    assert!(msg.contains(INDEX) && msg.contains("bytes of weights cannot hold the"), "{msg}");
}

#[test]
fn shard_names_must_be_plain_file_names_in_the_directory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("bert");
    let (_, entries) = sharded_bert(&dir, 4);
    load_bert_dir(&dir).unwrap();
    // The first shard moved where each bad name finds it, so only the name check can refuse.
    let first = shard_name(0, 3);
    let outside = d.path().join("outside.safetensors");
    std::fs::rename(dir.join(&first), &outside).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(&outside, dir.join("sub").join(&first)).unwrap();
    let absolute = outside.to_str().unwrap().to_owned();
    for bad in ["../outside.safetensors", absolute.as_str(), &format!("sub/{first}"), "./sub/../x", "", ".", ".."] {
        let edited: Vec<_> =
            entries.iter().map(|(t, s)| (t.clone(), if *s == first { bad.to_owned() } else { s.clone() })).collect();
        write_index(&dir, &edited);
        let msg = input_err(load_bert_dir(&dir));
        let tensor = &edited.iter().find(|e| e.1 == bad).unwrap().0;
        assert!(msg.starts_with(&format!("{}:", dir.join(INDEX).display())), "{msg}");
        assert!(msg.contains(&format!("entry `{tensor}`: shard `{bad}` is not a plain file name")), "{msg}");
    }
    // A backslash is a separator on Windows, where an index may have been written.
    let edited: Vec<_> = entries.iter().map(|(t, s)| (t.clone(), s.replace("model-", "sub\\model-"))).collect();
    write_index(&dir, &edited);
    assert!(input_err(load_bert_dir(&dir)).contains("sub\\model-00001-of-00003.safetensors` is not a plain"));
}

#[test]
fn index_errors_name_the_index_and_the_entry() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("bert");
    let (tensors, entries) = sharded_bert(&dir, 5);
    let index = dir.join(INDEX).display().to_string();
    let second = shard_name(1, 3);

    // A listed shard that is not there.
    std::fs::rename(dir.join(&second), d.path().join("aside")).unwrap();
    let msg = input_err(load_bert_dir(&dir));
    let tensor = &entries.iter().find(|e| e.1 == second).unwrap().0;
    assert_eq!(msg, format!("{index}: `weight_map` entry `{tensor}`: shard `{second}` does not exist"));
    std::fs::rename(d.path().join("aside"), dir.join(&second)).unwrap();
    load_bert_dir(&dir).unwrap();

    // A listed tensor that its shard does not hold, or that another shard holds.
    let mut more = entries.clone();
    more.push(("bert.encoder.extra.weight".into(), second.clone()));
    write_index(&dir, &more);
    let msg = input_err(load_bert_dir(&dir));
    assert_eq!(
        msg,
        format!("{index}: `weight_map` puts tensor `bert.encoder.extra.weight` in `{second}`, which does not hold it")
    );
    let moved: Vec<_> =
        entries.iter().map(|(t, s)| (t.clone(), if t == tensor { shard_name(2, 3) } else { s.clone() })).collect();
    write_index(&dir, &moved);
    assert!(input_err(load_bert_dir(&dir)).contains(&format!("puts tensor `{tensor}` in `{}`", shard_name(2, 3))));
    write_index(&dir, &entries);

    // One tensor in two shards.
    let dup = tensors.iter().find(|t| t.0 == *tensor).unwrap().clone();
    let mut third: Vec<NamedTensor> = read_tensors(&dir.join(shard_name(2, 3))).unwrap();
    third.push(dup);
    write_as(&dir.join(shard_name(2, 3)), &third, Dtype::BF16);
    let msg = input_err(load_bert_dir(&dir));
    assert_eq!(msg, format!("{index}: tensor `{tensor}` appears in two shards, `{second}` and `{}`", shard_name(2, 3)));
}

#[test]
fn a_bad_index_file_is_refused_before_any_shard_is_read() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("bert");
    sharded_bert(&dir, 6);
    let cases = [
        (json!({"metadata": {}}).to_string(), "`weight_map` is missing or not an object"),
        (json!({"weight_map": {}}).to_string(), "`weight_map` lists no tensors"),
        (
            json!({"weight_map": {"bert.x": 3}}).to_string(),
            "`weight_map` entry `bert.x`: expected a file name, found a number",
        ),
        ("{".to_owned(), "invalid JSON"),
        (
            format!("{{\"weight_map\": {{}}, \"pad\": \"{}\"}}", "x".repeat(1 << 20)),
            "larger than the limit of 1048576 bytes",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(dir.join(INDEX), text).unwrap();
        let msg = input_err(load_bert_dir(&dir));
        assert!(msg.starts_with(&dir.join(INDEX).display().to_string()) && msg.contains(want), "{msg}");
    }
}

#[test]
fn pytorch_only_directories_get_the_conversion_command() {
    let d = tempfile::tempdir().unwrap();
    let bert = d.path().join("bert");
    write_bert_dir(&bert, &tiny_bert_json(0.02), 7, "");
    let model = d.path().join("model");
    save_model_dir(&model, &random_checkpoint(false, 7), None).unwrap();
    for dir in [&bert, &model] {
        std::fs::remove_file(dir.join(SINGLE)).unwrap();
    }
    // No weights at all: model.safetensors is what is missing, as before sharding existed.
    let e = load_bert_dir(&bert).unwrap_err();
    assert!(matches!(&e, Error::Io { file, .. } if file.ends_with(SINGLE)) && e.is_bad_input(), "{e}");

    for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        for dir in [&bert, &model] {
            std::fs::write(dir.join(pickle), b"PK\x03\x04").unwrap();
        }
        let (b, m) = (load_bert_dir(&bert).unwrap_err(), load_model_dir(&model).unwrap_err());
        assert!(b.is_bad_input() && m.is_bad_input());
        for (e, dir, class) in [(b, &bert, "AutoModel"), (m, &model, "EncoderDecoderModel")] {
            let msg = e.to_string();
            let dir = dir.display();
            let cmd = format!(
                "python -c \"from transformers import {class}; {class}.from_pretrained('{dir}')\
                 .save_pretrained('{dir}', safe_serialization=True)\""
            );
            assert!(msg.starts_with(&format!("{dir}/{pickle}: ")) && msg.ends_with(&cmd), "{msg}");
        }
        for dir in [&bert, &model] {
            std::fs::remove_file(dir.join(pickle)).unwrap();
        }
    }
}

#[test]
fn the_conversion_command_never_runs_what_a_path_spells() {
    assert_eq!(
        convert_command("/m/bert base", "AutoModel"),
        "python -c \"from transformers import AutoModel; AutoModel.from_pretrained('/m/bert base')\
         .save_pretrained('/m/bert base', safe_serialization=True)\""
    );
    assert_eq!(
        convert_command("/m/it's $(rm x)", "AutoModel"),
        "python -c \"import sys; from transformers import AutoModel; AutoModel.from_pretrained(sys.argv[1])\
         .save_pretrained(sys.argv[1], safe_serialization=True)\" '/m/it'\\''s $(rm x)'"
    );
}
