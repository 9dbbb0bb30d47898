//! Event files written by `worker::tensorboard` read back by our reader and by the
//! `tensorboard` Python package (its EventAccumulator, as `tensorboard --logdir` uses it), with
//! random tags, steps and values, across a resumed run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use worker::tensorboard::{EventWriter, read_scalars};

type Curves = BTreeMap<String, Vec<(i64, f32)>>;

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// A deterministic stream of values of every sign and magnitude, zero included.
fn value(seed: u64, i: u64) -> f32 {
    let x = kernels::rng::normal(seed, i);
    match i % 5 {
        0 => 0.0,
        1 => x * 1e-6,
        2 => x * 1e5,
        _ => x,
    }
}

/// Two runs into one directory: the first to step `crash`, then a resume from `resume_from`
/// (< crash) to `end`. Returns the curves a reader must see: the second run's points replace
/// the first run's from `resume_from + 1` on.
fn write_runs(dir: &Path, seed: u64) -> Curves {
    let tags = ["train/loss", "train/lr", "eval/bleu", "eval/rouge2"];
    let (resume_from, crash, end) = (3 + seed % 5, 12 + seed % 4, 20 + seed % 7);
    let mut want = Curves::new();
    let mut i = 0;
    for (run, (first, last)) in [(1, crash), (resume_from + 1, end)].into_iter().enumerate() {
        let mut w = EventWriter::create(dir).unwrap();
        if run == 1 {
            w.session_start(first).unwrap();
            for points in want.values_mut() {
                points.retain(|&(s, _)| s < first as i64);
            }
        }
        for step in first..=last {
            // Eval tags only every third step, as evaluations are.
            let n = if step % 3 == 0 { tags.len() } else { 2 };
            let values: Vec<(&str, f64)> = tags[..n]
                .iter()
                .map(|&t| {
                    i += 1;
                    (t, value(seed, i) as f64)
                })
                .collect();
            w.scalars(step, &values).unwrap();
            for (t, v) in values {
                want.entry(t.to_owned()).or_default().push((step as i64, v as f32));
            }
        }
    }
    want
}

#[test]
fn our_reader_reads_back_every_scalar() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let want = write_runs(dir.path(), seed);
    let (scalars, warnings) = read_scalars(dir.path()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut got = Curves::new();
    for s in scalars {
        got.entry(s.tag).or_default().push((s.step, s.value));
    }
    assert_eq!(got, want, "seed {seed}");
}

const PY_READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
print(json.dumps(out))
"#;

#[test]
fn tensorboard_python_reader_sees_the_same_scalars() {
    let Some(python) = std::env::var_os("B2B_PYTHON").filter(|p| !p.is_empty()) else {
        let required = std::env::var("B2B_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
        assert!(!required, "B2B_REQUIRE_PYTHON=1 but B2B_PYTHON is not set (scripts/setup_python.sh)");
        eprintln!("skipped: B2B_PYTHON is not set (export B2B_PYTHON=$(scripts/setup_python.sh))");
        return;
    };
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let want = write_runs(dir.path(), seed);
    let out = Command::new(python).args(["-c", PY_READ]).arg(dir.path()).output().expect("run $B2B_PYTHON");
    assert!(out.status.success(), "tensorboard reader failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let parsed: BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();
    // Python holds the f32 as a double: converting back must be exact.
    let got: Curves =
        parsed.into_iter().map(|(t, p)| (t, p.into_iter().map(|(s, v)| (s, v as f32)).collect())).collect();
    assert_eq!(got, want, "seed {seed}");
}
