//! `train`, `eval` and `generate` end to end on a tiny model, and bad job files exit 2 naming
//! the key or line.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::run_in;

const JOB: &str = r#"
name: tiny
model: { init: b2b }
data: { train: train.jsonl, validation: valid.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: 6, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 3 }
checkpoint: { dir: ckpt, every_steps: 3, keep: 1 }
eval: { every_steps: 3, beams: 2, max_len: 8, length_penalty: 0.6, metrics: [bleu, rouge] }
resources: { workers: 1, device: cpu }
"#;

#[test]
fn train_eval_generate_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let o = run_in(&["train", "job.yaml", "--eval-examples", "4"], root);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("validation loss") && err.contains("BLEU"), "{err}");
    // keep: 1 leaves only the last checkpoint, which verifies and loads (beside it: logs/, the
    // TensorBoard events).
    let ckpts: Vec<_> = std::fs::read_dir(root.join("ckpt"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "logs")
        .collect();
    assert_eq!(ckpts, vec![std::ffi::OsString::from("step-00000006")]);

    let o = run_in(
        &["eval", "--model", "ckpt/step-00000006", "--data", "valid.jsonl", "--json", "--beams", "2", "--max-len", "8"],
        root,
    );
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["loss", "bleu", "rouge1", "rouge2", "rougeL", "identical_share", "distinct1", "distinct2"] {
        assert!(v[key].as_f64().is_some_and(f64::is_finite), "eval --json lacks {key}: {v}");
    }
    // The trivial baselines beside the model: copying the source, and its first n words.
    let base = &v["baselines"];
    for (which, key) in [("copy", "bleu"), ("copy", "rougeL"), ("lead", "bleu"), ("lead", "rouge1")] {
        assert!(base[which][key].as_f64().is_some_and(|x| (0.0..=100.0).contains(&x)), "{which}.{key}: {v}");
    }
    assert!(base["lead_words"].as_u64().is_some_and(|n| n >= 1), "{v}");
    // kjv_web pairs share most words: copying the source scores far above zero.
    assert!(base["copy"]["bleu"].as_f64().unwrap() > 10.0, "{v}");
    let o = run_in(
        &["eval", "--model", "ckpt/step-00000006", "--data", "valid.jsonl", "--beams", "1", "--max-len", "8"],
        root,
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("metric\tmodel\tcopy\tlead-"), "{text}");

    let mut child = common::exe()
        .args(["generate", "--model", "ckpt/step-00000006", "--beams", "3", "--max-len", "6"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"And the Lord said unto Moses\nAnd God said\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2, "one output line per input line");

    // Running the finished job again resumes at its last step and trains nothing more.
    let o = run_in(&["train", "job.yaml"], root);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from"));
}

#[test]
fn bad_job_files_exit_2_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    let cases = [
        (JOB.replace("seed: 3", "seed: 3, sede: 4"), "sede"),
        (JOB.replace("micro_batch: 2", "micro_batch: 3"), "training.micro_batch"),
        (JOB.replace("lr: 1.0e-3", "lr: fast"), "training.lr"),
        (JOB.replace("resources: {", "resources: {{"), "line"),
    ];
    for (text, want) in cases {
        std::fs::write(root.join("bad.yaml"), text).unwrap();
        let o = run_in(&["train", "bad.yaml"], root);
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && e.contains("bad.yaml") && !e.contains("panicked"), "want `{want}` in: {e}");
    }
    // A malformed data line is named by file and line.
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let mut data = std::fs::read_to_string(root.join("train.jsonl")).unwrap();
    data.push_str("{\"source\": \"and\"}\n");
    std::fs::write(root.join("train.jsonl"), data).unwrap();
    let o = run_in(&["train", "job.yaml"], root);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("train.jsonl") && e.contains("line 33") && e.contains("target"), "{e}");
}

fn ckpt_names(root: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Issue 11 items 2 and 8: an empty `step-00000099/`, a user file beside the checkpoints and a
/// user directory named like a partial survive a run with keep: 1, which keeps its own newest
/// checkpoint; a partial directory left by a killed save of this job is removed at start.
#[test]
fn train_prunes_and_cleans_only_its_own_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let ckpt = root.join("ckpt");
    std::fs::create_dir_all(ckpt.join("step-00000099")).unwrap();
    std::fs::write(ckpt.join("notes.txt"), "mine").unwrap();
    let killed = ckpt.join("step-00000003.tmp.4242.0.1");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(killed.join(".bert2bert-writer"), r#"{"name":"tiny"}"#).unwrap();
    std::fs::write(killed.join("config.json"), "{").unwrap();
    std::fs::write(killed.join(".tmpAbC123"), "half a model").unwrap();
    let user = ckpt.join("step-00000003.tmp.mine");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("config.json"), "mine").unwrap();

    let o = run_in(&["train", "job.yaml", "--eval-examples", "0"], root);
    assert!(o.status.success());
    assert_eq!(
        ckpt_names(&ckpt),
        ["logs", "notes.txt", "step-00000003.tmp.mine", "step-00000006", "step-00000099"],
        "the killed save's partial dir is gone, the rest is as the user left it"
    );
    worker::state::verify_manifest(&ckpt.join("step-00000006")).unwrap();
    assert_eq!(std::fs::read_to_string(user.join("config.json")).unwrap(), "mine");
}

/// Issue 11 items 13d and 13e: a job whose checkpoint.dir holds another job's checkpoints is
/// refused (exit 2, naming the dir and the other job) unless checkpoint.resume_from names one,
/// and then the other job's checkpoints are never pruned; a checkpoint past training.steps is
/// refused rather than reported as done.
#[test]
fn train_refuses_other_jobs_checkpoints_and_finished_past_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    assert!(run_in(&["train", "job.yaml", "--eval-examples", "0"], root).status.success());

    let fewer = JOB.replace("steps: 6,", "steps: 4,");
    std::fs::write(root.join("fewer.yaml"), fewer).unwrap();
    let o = run_in(&["train", "fewer.yaml"], root);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("step-00000006: checkpoint step 6 is past training.steps 4: nothing to do"), "{e}");

    let other = JOB.replace("name: tiny", "name: other").replace("steps: 6,", "steps: 8,");
    std::fs::write(root.join("other.yaml"), &other).unwrap();
    let o = run_in(&["train", "other.yaml"], root);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    let dir = root.join("ckpt").canonicalize().unwrap();
    assert!(
        e.contains(&format!("{}: checkpoint.dir holds checkpoints of job `tiny`", dir.display()))
            && e.contains("checkpoint.resume_from"),
        "{e}"
    );

    let from = other.replace("keep: 1 }", "keep: 1, resume_from: ckpt/step-00000006 }");
    std::fs::write(root.join("other.yaml"), from).unwrap();
    let o = run_in(&["train", "other.yaml", "--eval-examples", "0"], root);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from"));
    assert_eq!(ckpt_names(&root.join("ckpt")), ["logs", "step-00000006", "step-00000008"]);
    let theirs = worker::state::verify_manifest(&root.join("ckpt/step-00000006")).unwrap();
    let ours = worker::state::verify_manifest(&root.join("ckpt/step-00000008")).unwrap();
    assert_eq!((theirs.job.unwrap().name, ours.job.unwrap().name), ("tiny".into(), "other".into()));
}

/// Issue 11 item 13d under a coordinator (`train --workers 2`): the job fails with the reason
/// naming checkpoint.dir and the other job, and the other job's checkpoint stays.
#[test]
fn coordinator_job_fails_over_another_jobs_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    assert!(run_in(&["train", "job.yaml", "--eval-examples", "0"], root).status.success());
    let other = JOB.replace("name: tiny", "name: other").replace("max_restarts: 0, ", "");
    std::fs::write(root.join("other.yaml"), other).unwrap();
    let o = common::bin(root).args(["train", "other.yaml", "--workers", "2"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("FAILED") && e.contains("checkpoint.dir holds checkpoints of job `tiny`"), "{e}");
    assert_eq!(ckpt_names(&root.join("ckpt")), ["logs", "step-00000006"]);
}

/// The classic input-independent collapse, on purpose: every training target is the same text,
/// so the model learns to say it whatever the source. `train` must say so (its output and the
/// TensorBoard events), and `eval` must flag it beside the copy baseline.
#[test]
fn a_model_trained_to_collapse_is_called_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    let same: String = model::testing::PAIRS
        .iter()
        .map(|(s, _)| serde_json::json!({"source": s, "target": "God said."}).to_string() + "\n")
        .collect();
    std::fs::write(root.join("train.jsonl"), same.repeat(4)).unwrap();
    std::fs::write(root.join("valid.jsonl"), &same).unwrap();
    let job = JOB
        .replace(
            "steps: 6, global_batch: 4, micro_batch: 2, lr: 1.0e-3",
            "steps: 40, global_batch: 8, micro_batch: 8, lr: 3.0e-3",
        )
        .replace("eval: { every_steps: 3", "eval: { every_steps: 40")
        .replace("checkpoint: { dir: ckpt, every_steps: 3", "checkpoint: { dir: ckpt, every_steps: 40");
    std::fs::write(root.join("job.yaml"), job).unwrap();
    let o = run_in(&["train", "job.yaml"], root);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("the model ignores its input (collapse)"), "no collapse warning: {err}");
    let eval =
        ["eval", "--model", "ckpt/step-00000040", "--data", "valid.jsonl", "--json", "--beams", "1", "--max-len", "8"];
    let o = run_in(&eval, root);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["collapsed"], true, "{v}");
    assert!(v["identical_share"].as_f64().unwrap() > 0.5, "{v}");
}

/// A model whose decoder start id is not the tokenizer's [CLS] would train on one protocol and
/// generate with another: `train` refuses it before step 1, naming the file and the key.
#[test]
fn a_decoder_start_that_is_not_the_tokenizers_cls_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let cfg_path = root.join("b2b/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let start = cfg["decoder_start_token_id"].as_i64().unwrap();
    cfg["decoder_start_token_id"] = serde_json::json!(start + 1);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = run_in(&["train", "job.yaml"], root);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("config.json") && err.contains("`decoder_start_token_id` is"), "{err}");
    assert!(!root.join("ckpt").join("step-00000003").exists(), "trained anyway");
}
