//! The command-line contract, end to end through the real binary: init, score and bench work
//! on a tiny BERT made here, and bad input exits 2 with a message that names the culprit.

mod common;

use std::path::Path;

use common::{run, stderr};
use model::testing;
use serde_json::Value;

/// A tiny random BERT directory; `break_tensor` writes that tensor with a wrong shape.
fn make_bert(dir: &Path, break_tensor: Option<&str>) {
    testing::write_bert_dir(dir, common::clock_seed(), break_tensor);
}

fn write_data(path: &Path, lines: &[&str]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

const GOOD: &[&str] = &[
    r#"{"source": "And the Lord said unto Moses", "target": "The Lord said to Moses"}"#,
    r#"{"source": "And God said", "target": "God said"}"#,
    r#"{"source": "the light of the day and the night of the earth", "target": "light is day, night is earth."}"#,
];

#[test]
fn init_then_score_is_batch_invariant_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = tmp.path().join("bert");
    make_bert(&bert, None);
    let out = tmp.path().join("b2b");
    let b = bert.to_str().unwrap();
    let o = run(&["init", "--encoder", b, "--decoder", b, "--variant", "bert2bert", "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).exists(), "init wrote no {f}");
    }
    let data = tmp.path().join("d.jsonl");
    write_data(&data, GOOD);
    let score = |bs: &str| -> Value {
        let o = run(&[
            "score",
            "--model",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--batch-size",
            bs,
        ]);
        assert!(o.status.success());
        serde_json::from_slice(&o.stdout).expect("score --json prints one JSON object")
    };
    let (one, all) = (score("1"), score("3"));
    let (a, b) = (one["per_example_loss"].as_array().unwrap(), all["per_example_loss"].as_array().unwrap());
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!(x.is_finite() && x > 0.0);
        // Padding in a bigger batch must not change any example's loss.
        assert!((x - y).abs() < 1e-5 * x, "batch 1 gives {x}, batch 3 gives {y}");
    }
    assert_eq!(one["tokens"], all["tokens"]);
}

#[test]
fn bench_prints_the_json_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = tmp.path().join("bert");
    make_bert(&bert, None);
    let out = tmp.path().join("b2b");
    let b = bert.to_str().unwrap();
    assert!(
        run(&["init", "--encoder", b, "--decoder", "random", "--variant", "bert2rnd", "--out", out.to_str().unwrap()])
            .status
            .success()
    );
    let o = run(&[
        "bench",
        "--model",
        out.to_str().unwrap(),
        "--batch",
        "3",
        "--src-len",
        "9",
        "--tgt-len",
        "7",
        "--steps",
        "2",
        "--json",
    ]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["device", "step_ms_median", "tokens_per_s", "peak_rss_bytes", "peak_device_bytes", "mfu"] {
        assert!(v.get(key).is_some(), "bench --json lacks {key}");
    }
    assert!(v["step_ms_median"].as_f64().unwrap() > 0.0);
    assert!(v["last_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn bad_inputs_exit_2_and_name_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    make_bert(&good, None);
    let g = good.to_str().unwrap();

    // A tensor of the wrong shape in the BERT checkpoint.
    let bad_shape = tmp.path().join("bad_shape");
    make_bert(&bad_shape, Some("encoder.layer.1.attention.self.query.weight"));
    let bs = bad_shape.to_str().unwrap();
    let o = run(&[
        "init",
        "--encoder",
        bs,
        "--decoder",
        bs,
        "--variant",
        "bert2bert",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("encoder.layer.1.attention.self.query.weight") && stderr(&o).contains("model.safetensors"),
        "{}",
        stderr(&o)
    );

    // A missing config key in the model directory.
    let out = tmp.path().join("b2b");
    assert!(
        run(&["init", "--encoder", g, "--decoder", g, "--variant", "bertshare", "--out", out.to_str().unwrap()])
            .status
            .success()
    );
    let data = tmp.path().join("d.jsonl");
    write_data(&data, GOOD);
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(out.join(f), broken.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    cfg["decoder"].as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(broken.join("config.json"), cfg.to_string()).unwrap();
    let o = run(&["score", "--model", broken.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("num_attention_heads") && stderr(&o).contains("config.json"), "{}", stderr(&o));

    // A malformed JSONL line and an empty target, each named by file and line.
    let m = out.to_str().unwrap();
    let cases: [(&[&str], &str); 2] = [
        (&[GOOD[0], r#"{"source": "and the", "target": "the" "#, GOOD[1]], "line 2"),
        (&[GOOD[0], GOOD[1], r#"{"source": "and the", "target": "  "}"#], "line 3"),
    ];
    for (lines, want) in cases {
        write_data(&data, lines);
        let o = run(&["score", "--model", m, "--data", data.to_str().unwrap(), "--json"]);
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(e.contains(want) && e.contains("d.jsonl"), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(o.stdout.is_empty(), "no partial JSON on failure");
    }
    write_data(&data, &[r#"{"source": "and the", "target": ""}"#]);
    assert!(stderr(&run(&["score", "--model", m, "--data", data.to_str().unwrap()])).contains("target"));

    // Usage errors.
    let o = run(&["init", "--encoder", g, "--decoder", "random", "--variant", "bert2bert", "--out", "/tmp/never"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["bench", "--config", "minilm", "--device", "cuda", "--steps", "1"]);
    assert_eq!(o.status.code(), Some(2));
}

/// `base` with `extra` (`--flag value`) set: replaced where `base` has the flag, else appended
/// (clap refuses a flag given twice).
fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = base.to_vec();
    match args.iter().position(|a| *a == extra[0]) {
        Some(i) => args[i + 1] = extra[1],
        None => args.extend_from_slice(extra),
    }
    args
}

/// `code` and every piece of `want` in stderr, and no panic.
fn assert_refused(o: &std::process::Output, code: i32, want: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{e}");
    assert!(want.iter().all(|w| e.contains(w)), "{e} lacks one of {want:?}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn out_of_range_flags_exit_2_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    common::tiny_model(tmp.path(), 3);
    let (m, d) = (tmp.path().join("b2b"), tmp.path().join("train.jsonl"));
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    let eval = ["eval", "--model", m, "--data", d, "--beams", "1", "--max-len", "4"];
    // The tiny model has 64 positions.
    for (extra, flag) in [
        (&["--max-source-len", "1"][..], "--max-source-len must be at least 3"),
        (&["--max-target-len", "0"][..], "--max-target-len must be at least 2"),
        (
            &["--max-source-len", "100000"][..],
            "--max-source-len 100000 exceeds the model's max_position_embeddings (64)",
        ),
        (&["--batch-size", "0"][..], "--batch-size"),
    ] {
        assert_refused(&run(&with(&eval, extra)), 2, &[flag]);
    }
    let bench = ["bench", "--model", m, "--batch", "2", "--src-len", "8", "--tgt-len", "8", "--steps", "1"];
    for (extra, flag) in [
        (&["--src-len", "100000"][..], "--src-len must be in 2..=64"),
        (&["--tgt-len", "65"][..], "--tgt-len must be in 2..=64"),
        (&["--warmup", "18446744073709551615"][..], "--warmup must be in 0..=10000"),
        (&["--steps", "18446744073709551615"][..], "--steps must be in 1..=10000"),
        (&["--batch", "100000"][..], "--batch must be in 1..=4096"),
    ] {
        assert_refused(&run(&with(&bench, extra)), 2, &[flag]);
    }
    // bert-base at the largest batch and length needs far more memory than a test machine has.
    let big = ["bench", "--config", "bert-base", "--batch", "4096", "--src-len", "512", "--tgt-len", "512"];
    assert_refused(&run(&big), 2, &["needs about", "GB available"]);
    let generate = ["generate", "--model", m, "--beams", "2", "--max-len", "4"];
    for (extra, flag) in [
        (&["--beams", "100000"][..], "--beams must be in 1..=64"),
        (&["--batch-size", "0"][..], "--batch-size must be in 1..=4096"),
        (&["--min-len", "5"][..], "--min-len 5 exceeds --max-len 4"),
        (&["--length-penalty", "NaN"][..], "--length-penalty must be a finite number"),
        (&["--length-penalty", "inf"][..], "--length-penalty must be a finite number"),
        (&["--max-len", "64"][..], "--max-len 64 needs 65 decoder positions"),
        (&["--max-source-len", "65"][..], "--max-source-len 65 exceeds"),
    ] {
        assert_refused(&run(&with(&generate, extra)), 2, &[flag]);
    }
}

#[test]
fn a_config_claiming_a_million_layers_exits_2_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    common::tiny_model(tmp.path(), 3);
    let (m, d) = (tmp.path().join("b2b"), tmp.path().join("train.jsonl"));
    let cfg_path = m.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["encoder"]["num_hidden_layers"] = 1_000_000.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let start = std::time::Instant::now();
    let o = run(&["score", "--model", m.to_str().unwrap(), "--data", d.to_str().unwrap()]);
    assert_refused(&o, 2, &["config.json", "`num_hidden_layers` is above the limit of 128"]);
    assert!(start.elapsed().as_secs() < 30);
    // Within the per-key limits (a 1 GB model) but far beyond what the weights file holds:
    // refused before the parameter buffer is allocated.
    cfg["encoder"]["num_hidden_layers"] = 128.into();
    cfg["encoder"]["intermediate_size"] = 65536.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = run(&["score", "--model", m.to_str().unwrap(), "--data", d.to_str().unwrap()]);
    assert_refused(&o, 2, &["model.safetensors", "cannot hold the", "config.json"]);
}

#[test]
fn missing_and_special_input_files_exit_2_saying_the_os_error_once() {
    let tmp = tempfile::tempdir().unwrap();
    common::tiny_model(tmp.path(), 3);
    let m = tmp.path().join("b2b");
    let m = m.to_str().unwrap();
    let missing = tmp.path().join("nope.jsonl");
    let o = run(&["score", "--model", m, "--data", missing.to_str().unwrap()]);
    assert_refused(&o, 2, &["nope.jsonl"]);
    assert_eq!(stderr(&o).matches("No such file or directory").count(), 1, "{}", stderr(&o));
    let o = run(&["train", tmp.path().join("nope.yaml").to_str().unwrap()]);
    assert_refused(&o, 2, &["nope.yaml"]);
    assert_eq!(stderr(&o).matches("No such file or directory").count(), 1, "{}", stderr(&o));
    let o = run(&["score", "--model", tmp.path().join("nomodel").to_str().unwrap(), "--data", "/dev/zero"]);
    assert_refused(&o, 2, &["nomodel"]);
    let o = run(&["score", "--model", m, "--data", "/dev/zero"]);
    assert_refused(&o, 2, &["/dev/zero", "not a regular file"]);
}

#[test]
fn train_refuses_lengths_beyond_the_model_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    common::tiny_model(tmp.path(), 8);
    let job = |src: usize| {
        format!(
            "\u{feff}name: long\nmodel: {{ init: b2b }}\n\
             data: {{ train: train.jsonl, max_source_len: {src}, max_target_len: 12 }}\n\
             training: {{ steps: 1, global_batch: 2 }}\n"
        )
    };
    for (src, want) in [
        (100, "data.max_source_len: 100 exceeds the model's max_position_embeddings (64"),
        (100000, "data.max_source_len: must be at most 8192"),
    ] {
        std::fs::write(tmp.path().join("job.yaml"), job(src)).unwrap();
        let o = run(&["train", tmp.path().join("job.yaml").to_str().unwrap()]);
        assert_refused(&o, 2, &["job.yaml", want]);
    }
    assert!(!tmp.path().join("ckpt").exists(), "nothing ran");
}

/// Issue 11 item 1: `init --out` never deletes what it did not write. A directory of other
/// things and a plain file are refused with exit 2 naming the path; `--force` writes the model
/// beside the user's files; re-running over our own model directory replaces the model.
#[test]
fn init_out_refuses_foreign_targets_and_keeps_user_files() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = tmp.path().join("bert");
    make_bert(&bert, None);
    let b = bert.to_str().unwrap();
    let init = |out: &Path, extra: &[&str]| {
        let mut args = vec!["init", "--encoder", b, "--decoder", b, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&args)
    };
    let x = tmp.path().join("x");
    std::fs::create_dir_all(x.join("thesis")).unwrap();
    std::fs::write(x.join("thesis/ch1.tex"), "work").unwrap();
    let o = init(&x, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(&format!("{}: exists and is neither empty nor a model directory", x.display())));
    assert_eq!(std::fs::read_to_string(x.join("thesis/ch1.tex")).unwrap(), "work");
    assert!(!x.join("config.json").exists());

    let file = tmp.path().join("plain");
    std::fs::write(&file, "data").unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let o = init(&file, extra);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains(&format!("{}: exists and is not a directory", file.display())));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }

    // An old model directory with a user file: --force replaces the model, the file stays.
    let old = tmp.path().join("old");
    assert!(init(&old, &[]).status.success());
    std::fs::write(old.join("README.md"), "my notes").unwrap();
    let before = std::fs::read(old.join("model.safetensors")).unwrap();
    assert!(init(&old, &["--force", "--seed", "7"]).status.success());
    assert_eq!(std::fs::read_to_string(old.join("README.md")).unwrap(), "my notes");
    assert_ne!(std::fs::read(old.join("model.safetensors")).unwrap(), before, "the model was replaced");
    // Without --force too: it is a model directory.
    let o = init(&old, &["--seed", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<_> = std::fs::read_dir(&old).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["README.md", "config.json", "model.safetensors", "tokenizer.json"], "no temp files left");
}
