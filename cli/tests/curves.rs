//! Loss curves end to end: `bert2bert train` on a tiny job writes TensorBoard events for every
//! step (and a new file on resume), and `bert2bert plot` draws them to a PNG, tolerating a torn
//! last record and exiting 2 where there are no event files.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::run_in;
use worker::tensorboard::{event_files, frame, read_scalars};

const JOB: &str = r#"
name: tiny
model: { init: b2b }
data: { train: train.jsonl, validation: valid.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: 8, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 2, seed: 3 }
checkpoint: { dir: ckpt, every_steps: 4, keep: 1 }
eval: { every_steps: 4, beams: 2, max_len: 8, length_penalty: 0.6, metrics: [bleu, rouge] }
resources: { workers: 1, device: cpu }
"#;

/// The steps of each tag in the event files of `dir`.
fn steps_by_tag(dir: &Path) -> BTreeMap<String, Vec<i64>> {
    let (scalars, warnings) = read_scalars(dir).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut out = BTreeMap::<String, Vec<i64>>::new();
    for s in scalars {
        assert!(s.value.is_finite(), "{s:?}");
        out.entry(s.tag).or_default().push(s.step);
    }
    out
}

/// Width, height and the distinct colours of a PNG.
fn decode_png(path: &Path) -> (u32, u32, std::collections::HashSet<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
    let colours = buf[..info.buffer_size()].chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
    (info.width, info.height, colours)
}

#[test]
fn train_writes_event_files_and_plot_draws_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let o = run_in(&["train", "job.yaml", "--eval-examples", "1"], root);
    assert!(o.status.success());
    let logs = root.join("ckpt/logs");
    assert_eq!(event_files(&logs).unwrap().len(), 1);
    let tags = steps_by_tag(&logs);
    let every: Vec<i64> = (1..=8).collect();
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"] {
        assert_eq!(tags.get(tag), Some(&every), "{tag}: {tags:?}");
    }
    for tag in [
        "eval/loss",
        "eval/bleu",
        "eval/rouge1",
        "eval/rouge2",
        "eval/rougeL",
        "eval/identical_share",
        "eval/distinct2",
    ] {
        assert_eq!(tags.get(tag), Some(&vec![4, 8]), "{tag}: {tags:?}");
    }

    // A longer job resumes at step 8 and appends a second file; steps stay one each.
    std::fs::write(root.join("job.yaml"), JOB.replace("steps: 8,", "steps: 12,")).unwrap();
    let o = run_in(&["train", "job.yaml", "--eval-examples", "1"], root);
    assert!(o.status.success());
    assert_eq!(event_files(&logs).unwrap().len(), 2);
    assert_eq!(steps_by_tag(&logs)["train/loss"], (1..=12).collect::<Vec<i64>>());

    let o = run_in(&["plot", "job.yaml", "--out", "curves.png"], root);
    assert!(o.status.success());
    let (w, h, colours) = decode_png(&root.join("curves.png"));
    assert_eq!((w, h), (1200, 900));
    // White background, dark ink, and the curve colours (train/loss is blue).
    assert!(colours.len() > 20, "{} colours", colours.len());
    for want in [[255, 255, 255], [40, 40, 40], [31, 119, 180], [230, 110, 10]] {
        assert!(colours.contains(&want), "no {want:?} in the plot");
    }
    if let Some(keep) = std::env::var_os("B2B_KEEP_PLOT") {
        std::fs::copy(root.join("curves.png"), keep).unwrap();
    }

    // A crash mid-write leaves a torn last record: plot warns, skips it and still draws.
    let last = event_files(&logs).unwrap().pop().unwrap();
    let torn = frame(b"an event cut short by a crash");
    let mut bytes = std::fs::read(&last).unwrap();
    bytes.extend_from_slice(&torn[..torn.len() - 7]);
    std::fs::write(&last, bytes).unwrap();
    let o = run_in(&["plot", "ckpt/logs", "--out", "torn.png", "--width", "640", "--height", "480"], root);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // The warning is logged through tracing (level WARN), not printed as an error.
    assert!(err.contains("WARN") && err.contains("torn record"), "{err}");
    assert_eq!(decode_png(&root.join("torn.png")).0, 640);
}

#[test]
fn two_workers_write_one_event_file_from_rank_0() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model_with_validation(root);
    std::fs::write(root.join("job.yaml"), JOB.replace("workers: 1", "workers: 2")).unwrap();
    let o = run_in(&["train", "job.yaml", "--workers", "2"], root);
    assert!(o.status.success());
    let logs = root.join("ckpt/logs");
    assert_eq!(event_files(&logs).unwrap().len(), 1, "only rank 0 writes");
    let tags = steps_by_tag(&logs);
    assert_eq!(tags["train/loss"], (1..=8).collect::<Vec<i64>>());
    assert_eq!(tags["eval/loss"], [4, 8]);
    // Workers evaluate the loss only (no generation): no BLEU curve.
    assert!(!tags.contains_key("eval/bleu"), "{tags:?}");
}

#[test]
fn plot_without_event_files_exits_2_naming_the_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir(root.join("empty")).unwrap();
    let o = run_in(&["plot", "empty", "--out", "x.png"], root);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("empty") && err.contains("no TensorBoard event files"), "{err}");
    // A job whose log dir does not exist yet, and a path that is neither.
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
    let o = run_in(&["plot", "job.yaml"], root);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ckpt/logs: no such log directory"), "{err}");
    let o = run_in(&["plot", "nowhere"], root);
    assert_eq!(o.status.code(), Some(2));
    assert!(!root.join("x.png").exists() && !root.join("curves.png").exists());
}
