//! Failure recovery with real processes: a `coordinator` and `worker` processes on 127.0.0.1,
//! a tiny model, and faults injected from outside (kill -9 of a worker or of the coordinator,
//! SIGSTOP, SIGTERM). Every wait polls `status --json` with a deadline; every child is killed
//! on drop. The coordinator declares a worker dead after 2 s without heartbeats, a survivor's
//! collective gives up after 3 s, and a job short of workers starts on at least `min_workers`
//! after 1 s, so that each test recovers in seconds.

mod common;

use std::fs::File;
use std::io::BufReader;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Proc;
use model::testing;
use serde_json::Value;

const TOKEN: &str = "recovery-test-token";
const WAIT: Duration = Duration::from_secs(90);

/// [`common::bin`] logging at `info` without colours: the tests read the log lines.
fn bin(dir: &Path) -> Command {
    let mut c = common::bin_logging(dir, "info");
    c.env("NO_COLOR", "1");
    // The virtual GPU's NCCL meets in this test's directory, where a test can look.
    c.env("B2B_EMU_NCCL_DIR", dir.join("nccl"));
    c
}

/// A tiny BERT2BERT model, training pairs and a job file in `root`. Dropout is off so that
/// runs with different micro-batch layouts can be compared.
fn setup(root: &Path, job: &str) {
    let seed = common::clock_seed();
    eprintln!("recovery test seed {seed}");
    let bert = root.join("bert");
    testing::write_bert_dir(&bert, seed, None);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(bert.join("config.json")).unwrap()).unwrap();
    cfg["hidden_dropout_prob"] = 0.0.into();
    cfg["attention_probs_dropout_prob"] = 0.0.into();
    std::fs::write(bert.join("config.json"), cfg.to_string()).unwrap();
    testing::write_pairs(&root.join("train.jsonl"), 8);
    common::init_b2b(bin(root));
    std::fs::write(root.join("job.yaml"), job).unwrap();
}

/// A job long enough to be interrupted: 2 workers, down to 1 after a failure.
fn long_job(steps: u64) -> String {
    format!(
        r#"
name: recovery
model: {{ init: b2b }}
data: {{ train: train.jsonl, max_source_len: 16, max_target_len: 12 }}
training: {{ steps: {steps}, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 5 }}
checkpoint: {{ dir: ckpt, every_steps: 10, keep: 3 }}
resources: {{ workers: 2, min_workers: 1, device: cpu, max_restarts: 20 }}
"#
    )
}

/// A coordinator process (restartable on the same port and state) and its worker processes.
struct Cluster {
    root: PathBuf,
    port: u16,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
    /// Each worker's log file, by index in `workers`.
    worker_logs: Vec<PathBuf>,
    started: usize,
}

impl Cluster {
    fn new(root: &Path) -> Cluster {
        // A free port now, so that a restarted coordinator can listen on the same one.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = Cluster {
            root: root.to_owned(),
            port,
            coordinator: None,
            workers: Vec::new(),
            worker_logs: Vec::new(),
            started: 0,
        };
        c.start_coordinator();
        c
    }

    /// A cluster whose coordinator is not started yet (its port is chosen already).
    fn without_coordinator(root: &Path) -> Cluster {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (coordinator, workers, worker_logs) = (None, Vec::new(), Vec::new());
        Cluster { root: root.to_owned(), port, coordinator, workers, worker_logs, started: 0 }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&mut self, name: &str) -> (File, PathBuf) {
        self.started += 1;
        let path = self.root.join(format!("log-{:02}-{name}.txt", self.started));
        (File::create(&path).unwrap(), path)
    }

    /// Waits until worker `i`'s log has a line containing `needle`; returns that line.
    fn wait_log(&self, i: usize, needle: &str) -> String {
        self.wait_file(&self.worker_logs[i], &[needle])
    }

    /// Waits until the log at `path` has a line containing one of `needles`; returns it.
    fn wait_file(&self, path: &Path, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| needles.iter().any(|n| l.contains(n))) {
                return line.to_owned();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} never logged any of {needles:?}\n{}", path.display(), self.logs());
    }

    fn start_coordinator(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let (log, _) = self.log("coordinator");
        let mut child = bin(&self.root)
            .args(["coordinator", "--listen", &listen, "--state", "state"])
            .args(["--heartbeat-timeout", "2", "--elastic-wait", "1"])
            .env("BERT2BERT_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let line = common::read_line(&mut BufReader::new(child.stdout.take().unwrap()));
        assert!(line.starts_with("listening on "), "coordinator did not start: {line:?}\n{}", self.logs());
        self.coordinator = Some(Proc(child));
    }

    /// Starts a worker process; returns its index in `workers`.
    fn add_worker(&mut self) -> usize {
        self.add_worker_with(&[])
    }

    /// Starts a worker process with `extra` arguments; returns its index in `workers`.
    fn add_worker_with(&mut self, extra: &[&str]) -> usize {
        let (log, path) = self.log("worker");
        self.worker_logs.push(path);
        let child = bin(&self.root)
            .args(["worker", "--coordinator", &self.url(), "--collective-timeout", "3"])
            .args(extra)
            .env("BERT2BERT_WORKER_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.push(Proc(child));
        self.workers.len() - 1
    }

    fn client(&self, args: &[&str]) -> std::process::Output {
        common::client(bin(&self.root), &self.url(), TOKEN, args)
    }

    fn submit(&self) -> String {
        self.submit_file("job.yaml")
    }

    fn submit_file(&self, file: &str) -> String {
        let o = self.client(&["submit", file]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// The job as `status --json` shows it; `None` while the coordinator does not answer.
    fn status(&self, job: &str) -> Option<Value> {
        let o = self.client(&["status", job, "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Polls the job until `pred` holds; panics (with every log's tail) past the deadline or
    /// when the job ends otherwise.
    fn wait_for(&self, job: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(v) = self.status(job) {
                if pred(&v) {
                    return v;
                }
                let state = v["state"].as_str().unwrap_or("");
                assert!(
                    !matches!(state, "SUCCEEDED" | "FAILED" | "CANCELLED"),
                    "job ended before {what}: {v}\n{}",
                    self.logs()
                );
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}; last status {last:?}\n{}", self.logs());
    }

    fn wait_succeeded(&self, job: &str) -> Value {
        let v = self.wait_for(job, "SUCCEEDED", |v| matches!(v["state"].as_str(), Some("SUCCEEDED" | "FAILED")));
        assert_eq!(v["state"], "SUCCEEDED", "{v}\n{}", self.logs());
        assert_eq!(v["step"], v["total_steps"], "{v}");
        v
    }

    /// Every worker's whole log.
    fn worker_log_text(&self) -> String {
        self.worker_logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }

    /// The last lines of every process's log, for failure messages.
    fn logs(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("log-")))
            .collect();
        names.sort();
        let mut out = String::new();
        for p in names {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("==== {}\n", p.file_name().unwrap().to_string_lossy());
            for l in &lines[lines.len().saturating_sub(25)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

/// The newest checkpoint directory, after checking that every one left on disk verifies.
fn verified_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let all = worker::state::list_checkpoints(&root.join("ckpt"));
    for (_, dir) in &all {
        worker::state::verify_manifest(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    all
}

fn assert_final_checkpoint(root: &Path, total: u64) {
    let all = verified_checkpoints(root);
    assert_eq!(all.last().map(|c| c.0), Some(total), "{all:?}");
}

/// The newest committed checkpoint is at least `step`.
fn committed(step: u64) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["checkpoint_step"].as_u64().unwrap_or(0) >= step
}

#[test]
fn killed_worker_job_re_forms_and_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let total = 400;
    setup(root, &long_job(total));
    let mut c = Cluster::new(root);
    let (a, _b) = (c.add_worker(), c.add_worker());
    let job = c.submit();
    let before = c.wait_for(&job, "a committed checkpoint", committed(10));
    c.workers[a].0.kill().unwrap();
    c.workers[a].0.wait().unwrap();
    // A replacement joins later; the survivor may already have gone on alone.
    c.add_worker();
    let v = c.wait_succeeded(&job);
    assert!(before["step"].as_u64().unwrap() < total, "the kill came after the end: {before}");
    assert!(v["restarts"].as_u64().unwrap() >= 1, "{v}");
    assert_final_checkpoint(root, total);
}

/// A job for exactly 2 workers whose only checkpoint is the final one, so that a resume from a
/// checkpoint would start over from step 0.
fn peer_job(tag: &str, steps: u64) -> String {
    format!(
        r#"
name: peer
model: {{ init: b2b }}
data: {{ train: train.jsonl, max_source_len: 16, max_target_len: 12 }}
training: {{ steps: {steps}, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 5 }}
checkpoint: {{ dir: ckpt{tag}, every_steps: 1000000, keep: 1 }}
resources: {{ workers: 2, min_workers: 2, device: cpu, max_restarts: 5 }}
"#
    )
}

/// The final checkpoint's parameters and AdamW moments, as bits.
fn final_state_bits(dir: &Path) -> Vec<u32> {
    worker::state::verify_manifest(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let params = model::checkpoint::load_model_dir(dir).unwrap().params;
    let st = worker::state::read_state(dir, 1 << 30).unwrap();
    params.iter().chain(&st.adam_m).chain(&st.adam_v).map(|x| x.to_bits()).collect()
}

/// kill -9 of rank 0 of two: the survivor keeps its state in memory, a spare worker takes the
/// dead one's place, and the new gang resumes from the survivor's step (handed over the ring,
/// checked by its hash) instead of from step 0. No step is lost, and the result is bit for bit
/// the one an uninterrupted run of two workers reaches.
#[test]
fn killed_worker_is_replaced_from_a_survivors_memory_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let total = 400;
    setup(root, &peer_job("", total));
    std::fs::write(root.join("straight.yaml"), peer_job("-straight", total)).unwrap();
    let mut c = Cluster::new(root);
    let ws = [c.add_worker(), c.add_worker()];
    let job = c.submit();
    let before = c.wait_for(&job, "step 20", |v| v["step"].as_u64().unwrap_or(0) >= 20);
    let rank0 = *ws.iter().find(|&&w| c.wait_log(w, "assigned").contains("rank=0")).unwrap();
    let spare = c.add_worker();
    c.wait_log(spare, "registered");
    c.workers[rank0].0.kill().unwrap();
    c.workers[rank0].0.wait().unwrap();
    let v = c.wait_succeeded(&job);
    assert!(before["step"].as_u64().unwrap() < total, "the kill came after the end: {before}");
    let resumed = c.wait_log(spare, "state in memory at step");
    let step: u64 = resumed.rsplit(' ').next().unwrap().trim().parse().unwrap();
    assert!(step >= 20 && step < total, "{resumed}");
    let g = &v["goodput"];
    assert_eq!((g["failures"].as_u64(), g["steps_lost"].as_u64()), (Some(1), Some(0)), "{v}");
    assert!(g["ratio"].as_f64().unwrap() > 0.0 && g["recovering_s"].as_f64().unwrap() > 0.0, "{v}");
    // Rank 0 of the second attempt wrote the failure into the job's TensorBoard events, at the
    // step it resumed from.
    let (scalars, _) = worker::tensorboard::read_scalars(&root.join("ckpt").join("logs")).unwrap();
    let failures: Vec<(i64, f32)> =
        scalars.iter().filter(|s| s.tag == "goodput/failures").map(|s| (s.step, s.value)).collect();
    assert_eq!(failures.last(), Some(&(step as i64, 1.0)), "{failures:?}");
    train(root, "straight.yaml", "2");
    let name = format!("step-{total:08}");
    let (got, want) =
        (final_state_bits(&root.join("ckpt").join(&name)), final_state_bits(&root.join("ckpt-straight").join(&name)));
    assert_eq!(got.len(), want.len());
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} values differ from the uninterrupted run", got.len());
}

#[test]
fn killed_coordinator_restarts_on_its_state_and_the_job_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let total = 400;
    setup(root, &long_job(total));
    let mut c = Cluster::new(root);
    c.add_worker();
    c.add_worker();
    let job = c.submit();
    let before = c.wait_for(&job, "a committed checkpoint", committed(10));
    let mut coordinator = c.coordinator.take().unwrap();
    coordinator.0.kill().unwrap();
    coordinator.0.wait().unwrap();
    // Same port and state directory: the workers keep their ids and reconnect on their own.
    c.start_coordinator();
    c.wait_succeeded(&job);
    assert!(before["step"].as_u64().unwrap() < total, "the kill came after the end: {before}");
    assert_final_checkpoint(root, total);
}

#[test]
fn stopped_worker_is_dropped_and_the_job_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let total = 400;
    setup(root, &long_job(total));
    let mut c = Cluster::new(root);
    let (a, b) = (c.add_worker(), c.add_worker());
    let job = c.submit();
    let before = c.wait_for(&job, "a committed checkpoint", committed(10));
    c.workers[a].signal("STOP");
    // The survivor's collective times out and the stopped worker misses its heartbeats; the
    // job goes back to PENDING (a restart) and then runs again without it.
    let t0 = Instant::now();
    c.wait_for(&job, "a restart", |v| v["restarts"].as_u64().unwrap_or(0) >= 1);
    let detected = t0.elapsed();
    // The coordinator drops the silent worker; the survivor gives up its attempt, on its
    // collective's timeout or on the coordinator's STOP, whichever comes first.
    c.wait_file(&root.join("log-01-coordinator.txt"), &["worker lost: no heartbeat"]);
    c.wait_file(&c.worker_logs[b], &["attempt failed", "attempt stopped"]);
    c.add_worker();
    let v = c.wait_succeeded(&job);
    assert!(before["step"].as_u64().unwrap() < total, "the stop came after the end: {before}");
    assert!(detected < Duration::from_secs(20), "noticed the stopped worker only after {detected:?}");
    assert!(v["restarts"].as_u64().unwrap() >= 1, "{v}");
    assert_final_checkpoint(root, total);
    c.workers[a].signal("CONT");
}

#[test]
fn sigterm_worker_checkpoints_exits_zero_and_the_job_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let total = 400;
    setup(root, &long_job(total));
    let mut c = Cluster::new(root);
    // Ranks follow registration order: `a` registers first, so it is rank 0, the one that
    // writes checkpoints.
    let a = c.add_worker();
    c.wait_log(a, "registered");
    let b = c.add_worker();
    let job = c.submit();
    let before = c.wait_for(&job, "a committed checkpoint", committed(10));
    c.workers[a].signal("TERM");
    let status = c.workers[a].wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}\n{}", c.logs());
    let v = c.wait_succeeded(&job);
    assert!(before["step"].as_u64().unwrap() < total, "the signal came after the end: {before}");
    assert!(v["restarts"].as_u64().unwrap() >= 1, "{v}");
    assert_final_checkpoint(root, total);
    // Rank 0 finished its step and checkpointed it before leaving: the survivor resumed there.
    let step_of = |line: &str| {
        line.rsplit("step").next().and_then(|s| s.trim_matches(|c: char| !c.is_ascii_digit()).parse::<u64>().ok())
    };
    let left = c.wait_log(a, "attempt stopped: worker shutting down (SIGTERM)");
    c.wait_log(a, "deregistered");
    let stopped_at = step_of(&left);
    assert!(stopped_at.is_some(), "{left}");
    let log = std::fs::read_to_string(&c.worker_logs[b]).unwrap();
    let resumes: Vec<&str> = log.lines().filter(|l| l.contains("resumed from")).collect();
    assert!(
        resumes.iter().any(|l| step_of(l) == stopped_at),
        "rank 0 left at {stopped_at:?} but the survivor resumed from {resumes:?}\n{left}"
    );
}

#[test]
fn idle_worker_exits_zero_on_sigterm_and_at_once_on_a_second_signal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c = Cluster::new(root);
    let (a, b) = (c.add_worker(), c.add_worker());
    c.wait_log(a, "registered");
    c.wait_log(b, "registered");
    c.workers[a].signal("TERM");
    let status = c.workers[a].wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}\n{}", c.logs());
    // The first signal asks for a graceful stop, which an idle worker takes at its next poll
    // (up to 2 s away); the second one, right behind it, exits at once with status 1.
    c.workers[b].signal("TERM");
    c.workers[b].signal("INT");
    let status = c.workers[b].wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", c.logs());
}

/// A job at 10 steps, global batch 8, with `workers`, `min_workers`, `micro_batch`; its
/// checkpoints go to `ckpt{tag}`.
fn equivalence_job(workers: usize, min_workers: usize, micro: usize, tag: &str) -> String {
    format!(
        r#"
name: equivalence
model: {{ init: b2b }}
data: {{ train: train.jsonl, max_source_len: 16, max_target_len: 12 }}
training: {{ steps: 10, global_batch: 8, micro_batch: {micro}, lr: 1.0e-3, warmup_steps: 2, label_smoothing: 0.1, precision: fp32, seed: 11 }}
checkpoint: {{ dir: ckpt{tag}, every_steps: 100, keep: 1 }}
resources: {{ workers: {workers}, min_workers: {min_workers}, device: cpu }}
"#
    )
}

/// `bert2bert train FILE --workers N` must succeed.
fn train(root: &Path, file: &str, workers: &str) {
    let o = bin(root).args(["train", file, "--workers", workers]).output().unwrap();
    assert!(o.status.success(), "train {file}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The final (step 10) parameters under `ckpt{a}` and `ckpt{b}` agree within 1e-5 relative, and
/// training moved them from the initial model.
fn assert_same_parameters(root: &Path, a: &str, b: &str) {
    let load = |tag: &str| {
        let dir = root.join(format!("ckpt{tag}")).join("step-00000010");
        worker::state::verify_manifest(&dir).unwrap();
        model::checkpoint::load_model_dir(&dir).unwrap()
    };
    let (one, two) = (load(a), load(b));
    let init = model::checkpoint::load_model_dir(&root.join("b2b")).unwrap();
    assert_eq!(two.params.len(), one.params.len());
    let model::testing::ParamDiff { worst, worst_name, worst_key_bias } =
        model::testing::param_diff(&one.table, &one.params, &two.params);
    eprintln!("max relative difference {a} vs {b}: {worst:e} ({worst_name}); key biases {worst_key_bias:e}");
    assert!(worst < 1e-5, "{a} and {b} differ by {worst:e} in {worst_name}");
    assert!(worst_key_bias < 1e-2, "key biases differ by {worst_key_bias:e}");
    let moved = one.params.iter().zip(&init.params).filter(|(a, b)| a != b).count();
    assert!(moved > one.params.len() / 2, "only {moved} parameters changed in 10 steps");
}

/// `train --workers 2` (two worker processes, micro-batch 2) and `train --workers 1`
/// (micro-batch 4) at the same global batch and seed reach the same parameters.
#[test]
fn two_worker_processes_equal_one_with_twice_the_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, &equivalence_job(2, 2, 2, "2"));
    std::fs::write(root.join("job1.yaml"), equivalence_job(1, 1, 4, "1")).unwrap();
    train(root, "job.yaml", "2");
    train(root, "job1.yaml", "1");
    assert_same_parameters(root, "1", "2");
}

/// An elastic gang that does not divide the batch: a job for 4 workers (4 micro-batches of 2)
/// starts on the 3 there are after the elastic wait; its ranks run 2, 1 and 1 micro-batches,
/// and the update is still the one a single process makes.
#[test]
fn elastic_gang_of_three_for_four_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, &equivalence_job(4, 3, 2, "3"));
    std::fs::write(root.join("job1.yaml"), equivalence_job(1, 1, 2, "1")).unwrap();
    let mut c = Cluster::new(root);
    let ws: Vec<usize> = (0..3).map(|_| c.add_worker()).collect();
    let job = c.submit();
    c.wait_succeeded(&job);
    let assigned = c.wait_log(ws[0], "assigned");
    assert!(assigned.contains("world=3"), "{assigned}");
    train(root, "job1.yaml", "1");
    assert_same_parameters(root, "1", "3");
}

/// A job that started short (1 of 2 workers, after the elastic wait) grows to 2 when a second
/// worker turns up: at rank 0's next checkpoint the attempt ends, without counting a restart,
/// and the job finishes on a gang of 2 from that checkpoint.
#[test]
fn short_gang_grows_when_a_worker_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, &long_job(300));
    let mut c = Cluster::new(root);
    let first = c.add_worker();
    let job = c.submit();
    c.wait_for(&job, "the first step on one worker", |v| v["step"].as_u64().unwrap_or(0) >= 1);
    assert!(c.wait_log(first, "assigned").contains("world=1"));
    let second = c.add_worker();
    let joined = c.wait_log(second, "assigned");
    assert!(joined.contains("world=2"), "{joined}");
    let v = c.wait_succeeded(&job);
    assert_eq!(v["restarts"], 0, "growing is not a restart: {v}");
    assert_final_checkpoint(root, 300);
}

/// Pods start in any order: a worker started before its coordinator retries with backoff
/// (logging each retry) and registers once the coordinator listens.
#[test]
fn a_worker_started_before_its_coordinator_waits_and_registers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::without_coordinator(tmp.path());
    let w = c.add_worker();
    let first = c.wait_log(w, "retry 1 in");
    assert!(first.contains(&format!("127.0.0.1:{}", c.port)), "the retry names the address: {first}");
    c.wait_log(w, "retry 2 in");
    c.start_coordinator();
    c.wait_log(w, "registered");
    assert!(c.workers[w].0.try_wait().unwrap().is_none(), "the worker is still running\n{}", c.logs());
}

#[test]
fn connect_timeout_gives_up_promptly_naming_the_address() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::without_coordinator(tmp.path());
    let t0 = Instant::now();
    let w = c.add_worker_with(&["--connect-timeout", "1"]);
    let status = c.workers[w].wait_exit(Duration::from_secs(20)).expect("the worker gave up");
    assert_eq!(status.code(), Some(1), "{}", c.logs());
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let log = std::fs::read_to_string(&c.worker_logs[w]).unwrap();
    assert!(log.contains(&format!("127.0.0.1:{}", c.port)) && log.contains("--connect-timeout"), "{log}");
    let e = bin(tmp.path()).args(["worker", "--coordinator", &c.url(), "--connect-timeout", "-1"]).output().unwrap();
    assert_eq!(e.status.code(), Some(2), "{}", String::from_utf8_lossy(&e.stderr));
}

/// A worker's own roots (`--allow-data`) are checked, symlinks resolved, before it opens
/// anything: a job reading outside them fails at once (no retries), naming the key and not the
/// file's contents. The coordinator's roots refuse such a job at submit already.
#[test]
fn paths_outside_the_allowed_roots_are_refused_by_coordinator_and_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, &long_job(4));
    std::fs::create_dir(root.join("allowed")).unwrap();
    std::fs::write(root.join("secret.json"), "{\"source\": \"hunter2-secret\", \"target\": \"x\"}\n").unwrap();
    std::os::unix::fs::symlink(root.join("secret.json"), root.join("allowed/train.jsonl")).unwrap();
    let job = long_job(4).replace("train: train.jsonl", "train: allowed/train.jsonl");
    std::fs::write(root.join("job.yaml"), job).unwrap();

    let allowed = root.join("allowed");
    let allowed = allowed.to_str().unwrap();
    let (coord, url) = common::coordinator(root, TOKEN, &["--allow-data".as_ref(), root.join("nowhere").as_os_str()]);
    let o = common::client(bin(root), &url, TOKEN, &["submit", "job.yaml"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data.train: "), "{}", String::from_utf8_lossy(&o.stderr));

    drop(coord);
    // The coordinator lets it through (lexically inside); the worker resolves the symlink.
    let mut c = Cluster::new(root);
    let job = c.submit();
    c.add_worker_with(&["--allow-data", allowed]);
    c.add_worker_with(&["--allow-data", allowed]);
    let v = c.wait_for(&job, "FAILED", |v| v["state"] == "FAILED");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("data.train: ") && reason.contains("outside the allowed data roots"), "{reason}");
    assert!(!reason.contains("hunter2"), "{reason}");
    assert_eq!(v["restarts"], 0, "an input error is not retried: {v}");
}

/// Issue 11 item 10 on a worker: a coordinator that cannot see the model accepts the job, and
/// the worker, which can, refuses it before training: FAILED at once naming the key, no retry.
#[test]
fn lengths_past_the_models_positions_fail_the_job_on_the_worker_without_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, &long_job(4).replace("max_source_len: 16", "max_source_len: 100"));
    // The tiny test model has 64 positions; hide it from the coordinator while the job is submitted.
    std::fs::rename(root.join("b2b"), root.join("b2b.hidden")).unwrap();
    let mut c = Cluster::new(root);
    let job = c.submit();
    std::fs::rename(root.join("b2b.hidden"), root.join("b2b")).unwrap();
    c.add_worker();
    c.add_worker();
    let v = c.wait_for(&job, "FAILED", |v| v["state"] == "FAILED");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("data.max_source_len") && reason.contains("64"), "{reason}");
    assert_eq!(v["restarts"], 0, "an input error is not retried: {v}");
}

/// Two `worker --device cuda-emu` processes (the virtual GPU, emulated NCCL between them) run a
/// `device: cuda` job to the same parameters as one of them with twice the micro-batch, with
/// gradients all-reduced in one piece and in 4 KB buckets that overlap backward; the single
/// worker, whose job says `precision: fp32`, matches the CPU too (it would not with bf16 GEMMs).
/// A clean finish finalizes the communicators: no rendezvous files are left.
#[test]
fn two_virtual_gpu_workers_equal_one() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cuda = |job: String| job.replace("device: cpu", "device: cuda");
    setup(root, &cuda(equivalence_job(2, 2, 2, "2")));
    let bucketed = cuda(equivalence_job(2, 2, 2, "2b")).replace("seed: 11", "seed: 11, grad_bucket_mb: 0.004");
    std::fs::write(root.join("job2b.yaml"), bucketed).unwrap();
    std::fs::write(root.join("job1.yaml"), cuda(equivalence_job(1, 1, 4, "1"))).unwrap();
    std::fs::write(root.join("jobcpu.yaml"), equivalence_job(1, 1, 4, "cpu")).unwrap();
    let mut c = Cluster::new(root);
    c.add_worker_with(&["--device", "cuda-emu"]);
    c.add_worker_with(&["--device", "cuda-emu"]);
    for file in ["job.yaml", "job2b.yaml", "job1.yaml"] {
        let job = c.submit_file(file);
        c.wait_succeeded(&job);
    }
    train(root, "jobcpu.yaml", "1");
    assert!(c.worker_log_text().contains("cuda-emu"), "the workers did not run on the virtual GPU:\n{}", c.logs());
    assert_same_parameters(root, "1", "2");
    assert_same_parameters(root, "1", "2b");
    assert_same_parameters(root, "1", "cpu");
    let left: Vec<_> =
        std::fs::read_dir(root.join("nccl")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "NCCL rendezvous files left after clean finishes: {left:?}");
    // Finished communicators are finalized and destroyed, never aborted (NCCL's clean path).
    assert!(
        !c.worker_log_text().contains("ncclCommAbort"),
        "a communicator was aborted after a clean run:\n{}",
        c.logs()
    );
}

/// `kill -9` of one of two virtual-GPU workers while they train (each step ends in an NCCL
/// all-reduce): the survivor's collective fails within `--collective-timeout` instead of hanging,
/// it reports the failure, and the job re-forms and finishes from its checkpoint.
#[test]
fn killed_virtual_gpu_worker_mid_collective_job_recovers() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let total = 40;
    // Both workers from the start (an elastic start of one would leave nobody to lose a peer).
    setup(root, &long_job(total).replace("device: cpu", "device: cuda").replace("min_workers: 1", "min_workers: 2"));
    let mut c = Cluster::new(root);
    let (a, b) = (c.add_worker_with(&["--device", "cuda-emu"]), c.add_worker_with(&["--device", "cuda-emu"]));
    let job = c.submit();
    // Past the checkpoint at step 10, so that the survivor's state is the newer one.
    let before = c.wait_for(&job, "step 12", |v| v["step"].as_u64().unwrap_or(0) >= 12);
    c.workers[a].0.kill().unwrap();
    c.workers[a].0.wait().unwrap();
    let killed_at = Instant::now();
    // The survivor gives up on its collective and says so, well within the collective timeout
    // (3 s) plus the heartbeat that tells the coordinator.
    let line = c.wait_file(&c.worker_logs[b].clone(), &["attempt failed: device error: NCCL"]);
    eprintln!("survivor: {line}");
    assert!(killed_at.elapsed() < Duration::from_secs(30), "the survivor took {:?}", killed_at.elapsed());
    assert!(
        c.worker_log_text().contains("ncclCommAbort"),
        "the survivor did not abort its communicator:\n{}",
        c.logs()
    );
    c.add_worker_with(&["--device", "cuda-emu"]);
    let v = c.wait_succeeded(&job);
    assert!(before["step"].as_u64().unwrap() < total, "the kill came after the end: {before}");
    assert!(v["restarts"].as_u64().unwrap() >= 1, "{v}");
    assert_final_checkpoint(root, total);
    // The survivor kept its state through the aborted communicator, and the new gang resumed
    // from it over NCCL: no step lost.
    let from_memory = c.worker_log_text().lines().filter(|l| l.contains("state in memory at step")).count();
    assert_eq!(from_memory, 2, "both ranks resume from the survivor's memory\n{}", c.logs());
    assert_eq!(v["goodput"]["steps_lost"], 0, "{v}\n{}", c.logs());
}
