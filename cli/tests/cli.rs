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
