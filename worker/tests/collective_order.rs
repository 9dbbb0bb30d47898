//! How the trainer uses the `Collective` contract, with fake two-rank collectives on the CPU.
//!
//! On NCCL a collective runs on its own stream: its result is there only after `wait` (for the
//! compute stream) or `wait_timeout` (for the host). `Deferred` models that by applying each
//! all-reduce only at the next wait, so a step that reads a result before waiting for it trains
//! differently from one with an `eager` collective (the CPU ring's behaviour). And `wait_timeout`
//! must run, with the trainer's limit, before the step reads results back on the host; its error
//! (a dead peer) must fail the step instead of hanging or panicking.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use kernels::collective::Collective;
use kernels::{Cpu, KernelError, Memory, Result};
use model::job::JobSpec;
use model::{Variant, checkpoint, init, testing, tokenizer::Tokenizer};
use worker::Trainer;

/// Rank 0 of two; the other rank's values are a fixed pattern, so an all-reduce changes every
/// value, and not by a common factor (AdamW would hide that).
struct Deferred {
    /// Apply an all-reduce at once (like the CPU ring) instead of at the next wait (like NCCL).
    eager: bool,
    /// `wait_timeout` fails, as NCCL's does when a peer is dead.
    dead_peer: bool,
    /// Queued all-reduces: the address and length of their buffers.
    pending: Mutex<Vec<(usize, usize)>>,
    log: Mutex<Vec<String>>,
}

impl Deferred {
    fn new(eager: bool, dead_peer: bool) -> Self {
        Deferred { eager, dead_peer, pending: Mutex::new(Vec::new()), log: Mutex::new(Vec::new()) }
    }
    fn reduce(buf: &mut [f32]) {
        for (i, x) in buf.iter_mut().enumerate() {
            *x = (*x + 1e-3 * ((i % 13) as f32 - 6.0)) / 2.0;
        }
    }
    fn complete(&self) {
        for (ptr, len) in self.pending.lock().unwrap().drain(..) {
            // SAFETY: the trainer keeps every buffer it all-reduces alive, unmoved on the heap
            // and unread until it has waited (the contract this test checks: a read before the
            // wait would see the values unreduced), and nothing else holds them meanwhile.
            Self::reduce(unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, len) });
        }
    }
    fn note(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }
}

impl Collective<Cpu> for Deferred {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_avg(&self, _b: &Cpu, buf: &mut [f32]) -> Result<()> {
        self.note(format!("all_reduce {}", buf.len()));
        if self.eager {
            Self::reduce(buf);
        } else {
            self.pending.lock().unwrap().push((buf.as_mut_ptr() as usize, buf.len()));
        }
        Ok(())
    }
    fn broadcast(&self, _b: &Cpu, _buf: &mut [f32], _root: usize) -> Result<()> {
        Err(KernelError::Device("not used by the trainer".into()))
    }
    fn reduce_scatter_avg(&self, _b: &Cpu, _send: &[f32], _recv: &mut [f32]) -> Result<()> {
        Err(KernelError::Device("not used by the trainer".into()))
    }
    fn all_gather(&self, _b: &Cpu, _send: &[f32], _recv: &mut [f32]) -> Result<()> {
        Err(KernelError::Device("not used by the trainer".into()))
    }
    fn wait(&self, _b: &Cpu) -> Result<()> {
        self.note("wait".into());
        self.complete();
        Ok(())
    }
    fn wait_timeout(&self, _b: &Cpu, limit: Duration) -> Result<()> {
        self.note(format!("wait_timeout {limit:?}"));
        if self.dead_peer {
            return Err(KernelError::Device(format!("peer gone: timed out after {limit:?}")));
        }
        self.complete();
        Ok(())
    }
}

fn setup(root: &Path) -> JobSpec {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("collective_order test seed {seed}");
    let bert = root.join("bert");
    testing::write_bert_dir(&bert, seed, None);
    let tok = Tokenizer::from_file(&bert.join("tokenizer.json")).unwrap();
    let ck = init::warm_start(&bert, Some(&bert), Variant::Bert2Bert, tok.special(), seed).unwrap();
    checkpoint::save_model_dir(&root.join("b2b"), &ck, Some(&tok)).unwrap();
    testing::write_pairs(&root.join("train.jsonl"), 3);
    let text = r#"
name: order
model: { init: b2b }
data: { train: train.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: 3, global_batch: 12, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, precision: fp32, seed: 5 }
checkpoint: { dir: ckpt, every_steps: 100, keep: 1 }
resources: { workers: 2, device: cpu }
"#;
    JobSpec::from_str(text, &root.join("job.yaml")).unwrap()
}

/// Three steps with `coll` and gradient buckets of `bucket_mb`: the parameters and losses.
fn train(spec: &JobSpec, coll: &Deferred, bucket_mb: f64) -> (Vec<f32>, Vec<f64>, usize) {
    let (mut tr, _) = Trainer::new(&Cpu, coll, spec.clone()).unwrap();
    tr.grad_bucket_mb = bucket_mb;
    let losses: Vec<f64> = (0..3).map(|_| tr.step().unwrap().loss).collect();
    let n = tr.net.table.storage_len;
    (Cpu.download(Cpu.view(&tr.net.params, 0..n)).unwrap(), losses, tr.grad_bucket_count())
}

#[test]
fn results_are_read_only_after_waiting_for_them() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = setup(tmp.path());
    // 0.004 MB = 1000 values: several buckets all-reduced during backward.
    for bucket_mb in [0.0, 0.004] {
        let (p_eager, l_eager, buckets) = train(&spec, &Deferred::new(true, false), bucket_mb);
        let (p_late, l_late, _) = train(&spec, &Deferred::new(false, false), bucket_mb);
        assert_eq!(buckets > 2, bucket_mb > 0.0, "{buckets} buckets at {bucket_mb} MB");
        assert_eq!(l_late, l_eager, "bucket_mb {bucket_mb}: a loss was read before its all-reduce finished");
        let bad = p_late.iter().zip(&p_eager).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "bucket_mb {bucket_mb}: gradients were used before their all-reduce finished ({bad:?})");
    }
}

#[test]
fn each_step_waits_with_the_limit_before_reading_back_and_a_timeout_fails_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = setup(tmp.path());
    for bucket_mb in [0.0, 0.004] {
        let coll = Deferred::new(false, false);
        let (mut tr, _) = Trainer::new(&Cpu, &coll, spec.clone()).unwrap();
        assert_eq!(tr.collective_timeout, worker::trainer::DEFAULT_COLLECTIVE_TIMEOUT);
        tr.collective_timeout = Duration::from_secs(7);
        tr.grad_bucket_mb = bucket_mb;
        tr.step().unwrap();
        let log = coll.log.lock().unwrap().clone();
        // The gradients (whole or in buckets), then the loss, are all-reduced; the step waits on
        // the device, then once on the host with its limit, before clipping reads the norm back
        // and the loss is downloaded.
        let n = tr.net.table.storage_len;
        let tail = ["all_reduce 1", "wait", "wait_timeout 7s"].map(String::from);
        assert!(log.ends_with(&tail), "bucket_mb {bucket_mb}: {log:?}");
        let grads = &log[..log.len() - 3];
        if bucket_mb == 0.0 {
            assert_eq!(grads, [format!("all_reduce {n}")]);
        } else {
            // The buckets are copied back into the gradients only after a wait.
            assert_eq!(grads.last().map(String::as_str), Some("wait"), "{log:?}");
            assert!(grads[..grads.len() - 1].iter().all(|e| e.starts_with("all_reduce ")), "{log:?}");
        }
    }

    let coll = Deferred::new(false, true);
    let (mut tr, _) = Trainer::new(&Cpu, &coll, spec).unwrap();
    let n = tr.net.table.storage_len;
    let before = Cpu.download(Cpu.view(&tr.net.params, 0..n)).unwrap();
    let e = tr.step().unwrap_err().to_string();
    assert!(e.contains("peer gone"), "{e}");
    // Nothing was updated from results that never came.
    assert_eq!(tr.step, 0);
    assert_eq!(Cpu.download(Cpu.view(&tr.net.params, 0..n)).unwrap(), before);
}
