//! RoBERTa checkpoints and two vocabularies through the CLI: `init` by the RoBERTa variant
//! names (and their refusals), and a BERT encoder with a RoBERTa decoder (WordPiece sources,
//! byte-level BPE targets) that trains, evaluates and generates end to end.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{run_in, stderr, stdout};
use model::testing;

fn init(root: &std::path::Path, encoder: &str, decoder: &str, variant: &str, out: &str) -> std::process::Output {
    run_in(&["init", "--encoder", encoder, "--decoder", decoder, "--variant", variant, "--out", out], root)
}

#[test]
fn roberta_variants_by_name_and_a_mismatched_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    testing::write_roberta_dir(&root.join("roberta"), 4);
    testing::write_bert_dir(&root.join("bert"), 5, None);
    for (variant, decoder) in [
        ("roberta2roberta", "roberta"),
        ("robertaShare", "roberta"),
        ("roberta2rnd", "random"),
        ("rnd2roberta", "roberta"),
    ] {
        let out = format!("m-{variant}");
        let o = init(root, "roberta", decoder, variant, &out);
        assert!(o.status.success(), "{variant}: {}", stderr(&o));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join(&out).join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["decoder"]["model_type"], "roberta", "{variant}");
        assert_eq!(cfg["decoder_start_token_id"], 0, "<s>");
        assert_eq!(cfg["tie_encoder_decoder"], variant == "robertaShare");
    }
    // The report names RoBERTa's head as taken from the checkpoint.
    let o = init(root, "roberta", "roberta", "roberta2roberta", "m-report");
    assert!(stdout(&o).contains("from the checkpoints"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("decoder.lm_head.dense"), "the head comes from the file:\n{}", stdout(&o));

    let o = init(root, "roberta", "roberta", "bert2bert", "m-bad");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("use the roberta name of this layout (roberta2roberta)"), "{}", stderr(&o));
    let o = init(root, "bert", "bert", "roberta2roberta", "m-bad2");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("model_type `bert`"), "{}", stderr(&o));
    // One stack cannot be both families.
    let o = init(root, "bert", "roberta", "bertshare", "m-bad3");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

const JOB: &str = r#"
name: two-vocabs
model: { init: b2r }
data: { train: train.jsonl, validation: valid.jsonl, max_source_len: 24, max_target_len: 40 }
training: { steps: 4, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 3 }
checkpoint: { dir: ckpt, every_steps: 4, keep: 1 }
eval: { every_steps: 4, beams: 2, max_len: 8, metrics: [bleu, rouge] }
resources: { workers: 1, device: cpu }
"#;

#[test]
fn bert_encoder_roberta_decoder_trains_evaluates_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    testing::write_bert_dir(&root.join("bert"), 6, None);
    testing::write_roberta_dir(&root.join("roberta"), 7);
    testing::write_pairs(&root.join("train.jsonl"), 2);
    testing::write_pairs(&root.join("valid.jsonl"), 1);
    let o = init(root, "bert", "roberta", "bert2bert", "b2r");
    assert!(o.status.success(), "{}", stderr(&o));
    // Both vocabularies are kept: the encoder's as tokenizer.json, the decoder's beside it.
    let enc_tok = std::fs::read_to_string(root.join("b2r/tokenizer.json")).unwrap();
    let dec_tok = std::fs::read_to_string(root.join("b2r/decoder_tokenizer.json")).unwrap();
    assert!(enc_tok.contains("WordPiece") && dec_tok.contains("ByteLevel"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("b2r/config.json")).unwrap()).unwrap();
    assert_eq!((cfg["encoder"]["vocab_size"].as_u64(), cfg["decoder"]["vocab_size"].as_u64()), (Some(27), Some(263)));

    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let o = run_in(&["train", "job.yaml", "--eval-examples", "2"], root);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(root.join("ckpt/step-00000004/decoder_tokenizer.json").is_file(), "the checkpoint keeps both vocabularies");

    let o =
        run_in(&["eval", "--model", "ckpt/step-00000004", "--data", "valid.jsonl", "--json", "--max-len", "8"], root);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["loss"].as_f64().is_some_and(f64::is_finite) && v["bleu"].as_f64().is_some(), "{v}");
    // Targets are tokenized with the decoder's byte-level vocabulary: far more tokens than
    // WordPiece words (one validation pair set: 8 targets).
    assert!(v["tokens"].as_u64().unwrap() > 100, "{v}");

    let mut child = common::exe()
        .args(["generate", "--model", "ckpt/step-00000004", "--max-len", "6"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"And the Lord said unto Moses\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1);
}
