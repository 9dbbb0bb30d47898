//! Exact resume: 20 steps in one run give bitwise the same parameters as 10 steps, a stop, and
//! 10 resumed steps; and a damaged newest checkpoint is never resumed from.

use std::path::Path;

use kernels::collective::Single;
use kernels::{Cpu, Memory};
use model::job::JobSpec;
use model::{Variant, checkpoint, init, testing, tokenizer::Tokenizer};
use worker::{Event, Trainer};

fn setup(root: &Path) -> std::path::PathBuf {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("resume test seed {seed}");
    let bert = root.join("bert");
    testing::write_bert_dir(&bert, seed, None);
    let tok = Tokenizer::from_file(&bert.join("tokenizer.json")).unwrap();
    let ck = init::warm_start(&bert, Some(&bert), Variant::Bert2Bert, tok.special(), seed).unwrap();
    let model = root.join("b2b");
    checkpoint::save_model_dir(&model, &ck, Some(&tok)).unwrap();
    testing::write_pairs(&root.join("train.jsonl"), 3);
    testing::write_pairs(&root.join("valid.jsonl"), 1);
    model
}

fn job(root: &Path, ckpt: &str) -> JobSpec {
    let text = format!(
        r#"
name: resume-test
model: {{ init: b2b }}
data: {{ train: train.jsonl, validation: valid.jsonl, max_source_len: 16, max_target_len: 12 }}
training:
  steps: 20
  global_batch: 4
  micro_batch: 2
  lr: 1.0e-3
  warmup_steps: 3
  schedule: linear
  weight_decay: 0.01
  max_grad_norm: 1.0
  label_smoothing: 0.1
  precision: fp32
  seed: 7
checkpoint: {{ dir: {ckpt}, every_steps: 10, keep: 3 }}
resources: {{ workers: 1, device: cpu }}
"#
    );
    JobSpec::from_str(&text, &root.join("job.yaml")).unwrap()
}

fn params(t: &Trainer<'_, Cpu, Single>) -> Vec<f32> {
    let n = t.net.table.storage_len;
    Cpu.download(Cpu.view(&t.net.params, 0..n)).unwrap()
}

#[test]
fn twenty_steps_equal_ten_stop_ten() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let (b, c) = (Cpu, Single);

    let (mut straight, resumed) = Trainer::new(&b, &c, job(tmp.path(), "ckpt_a")).unwrap();
    assert!(resumed.is_none());
    let mut losses = Vec::new();
    straight
        .run(None, 0, &mut |e| {
            if let Event::Step(s) = e {
                losses.push(s.loss);
            }
        })
        .unwrap();
    assert_eq!(straight.step, 20);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[19] < losses[0], "loss should fall on a tiny repeated dataset: {losses:?}");

    let (mut first, _) = Trainer::new(&b, &c, job(tmp.path(), "ckpt_b")).unwrap();
    first.run(Some(10), 0, &mut |_| {}).unwrap();
    assert_eq!(first.step, 10);
    drop(first);
    let (mut second, resumed) = Trainer::new(&b, &c, job(tmp.path(), "ckpt_b")).unwrap();
    assert!(matches!(resumed, Some(Event::Resumed { step: 10, .. })), "{resumed:?}");
    second.run(None, 0, &mut |_| {}).unwrap();
    assert_eq!(second.step, 20);

    let (a, bb) = (params(&straight), params(&second));
    let differing = a.iter().zip(&bb).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} parameters differ after resume", a.len());
}

#[test]
fn damaged_newest_checkpoint_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let (b, c) = (Cpu, Single);
    let (mut t, _) = Trainer::new(&b, &c, job(tmp.path(), "ckpt")).unwrap();
    t.run(None, 0, &mut |_| {}).unwrap();
    let at_10 = tmp.path().join("ckpt/step-00000010");
    let at_20 = tmp.path().join("ckpt/step-00000020");
    assert!(at_10.is_dir() && at_20.is_dir());
    // Simulate a write torn after the rename (or bit rot): one byte of the weights changes.
    let model = at_20.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let (_, resumed) = Trainer::new(&b, &c, job(tmp.path(), "ckpt")).unwrap();
    match resumed {
        Some(Event::Resumed { step, from }) => {
            assert_eq!(step, 10);
            assert_eq!(from, at_10);
        }
        other => panic!("expected resume from step 10, got {other:?}"),
    }
}
