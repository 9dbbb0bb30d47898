//! Data-parallel training across real worker processes on 127.0.0.1:0: `train --workers 2`
//! (an in-process coordinator with two `bert2bert worker` children), and a `coordinator`
//! process with two `worker` processes and `submit --wait`. No fixed sleeps: every wait is for a
//! line or a process exit; every child is killed on drop.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use common::{Proc, bin};

const TOKEN: &str = "distributed-test-token";

fn setup(root: &Path) {
    common::tiny_model(root, 8);
    std::fs::write(root.join("job.yaml"), JOB).unwrap();
}

const JOB: &str = r#"
name: tiny-dp
model: { init: b2b }
data: { train: train.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: 4, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 3 }
checkpoint: { dir: ckpt, every_steps: 2, keep: 2 }
resources: { workers: 2, device: cpu }
"#;

/// The entries of `dir` (a TMPDIR given to `train --workers`), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn checkpoints(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("ckpt"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn train_with_two_worker_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let scratch = root.join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let o = bin(root).args(["train", "job.yaml", "--workers", "2"]).env("TMPDIR", &scratch).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{err}");
    assert!(o.status.success(), "{err}");
    assert!(err.contains("SUCCEEDED"), "{err}");
    assert!(checkpoints(root).contains(&"step-00000004".to_owned()), "{:?}\n{err}", checkpoints(root));
    // The coordinator's state directory (see `workers_exit_when_train_is_killed`) is gone.
    assert_eq!(entries(&scratch), Vec::<String>::new());
}

#[test]
fn coordinator_and_two_workers_run_a_submitted_job() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let (_coord, addr) = common::coordinator(root, TOKEN, &[]);
    let url = format!("http://{addr}");
    let _workers: Vec<Proc> = (0..2)
        .map(|_| {
            Proc(
                bin(root)
                    .args(["worker", "--coordinator", &url])
                    .env("BERT2BERT_WORKER_TOKEN", TOKEN)
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let o = common::client(bin(root), &url, TOKEN, &["submit", "job.yaml", "--wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).trim().starts_with("job-"));
    assert!(checkpoints(root).contains(&"step-00000004".to_owned()), "{:?}\n{err}", checkpoints(root));
    let o = common::client(bin(root), &url, TOKEN, &["status", "job-1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["step"].as_u64(), v["checkpoint_step"].as_u64()),
        (Some("SUCCEEDED"), Some(4), Some(4))
    );
}

/// The pids of live processes whose command line contains `needle` (Linux /proc).
#[cfg(target_os = "linux")]
fn processes_with(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Zombies (state Z) have exited already.
            let zombie = stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmd).contains(needle)
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn workers_exit_when_train_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    std::fs::write(root.join("job.yaml"), JOB.replace("steps: 4,", "steps: 100000,")).unwrap();
    let scratch = root.join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let mut train = Proc(
        bin(root)
            .args(["train", "job.yaml", "--workers", "2"])
            .env("TMPDIR", &scratch)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(train.0.stderr.take().unwrap());
    let mut url = None;
    let mut line = String::new();
    while url.is_none() {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "train ended before naming its coordinator");
        url = line.trim().strip_prefix("coordinator on ").and_then(|r| r.split(';').next()).map(str::to_owned);
    }
    // Arguments end with NUL in /proc/PID/cmdline: match the whole URL argument.
    let url = format!("{}\0", url.unwrap());
    // Wait until the workers train (a step line), then kill the parent outright.
    while !line.contains("step ") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "train ended early");
    }
    assert_eq!(processes_with(&url).len(), 2, "two workers run");
    // While it runs, the coordinator keeps its state in one directory under TMPDIR.
    let state = entries(&scratch);
    assert!(state.len() == 1 && state[0].starts_with("bert2bert-train-"), "{state:?}");
    assert!(scratch.join(&state[0]).join("coordinator.sqlite").is_file(), "{state:?}");
    train.0.kill().unwrap();
    train.0.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !processes_with(&url).is_empty() {
        assert!(std::time::Instant::now() < deadline, "orphaned workers: {:?}", processes_with(&url));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
