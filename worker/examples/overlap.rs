//! Step time with and without gradient buckets overlapped with backward, on ring ranks in one
//! process (threads, loopback TCP).
//!
//! `cargo run --release -p worker --example overlap -- --model models/minilm-b2b
//!  --data examples/data/kjv_web_sample/train.jsonl [--ranks 2] [--steps 6] [--bucket-mb 0,25]
//!  [--batch 8] [--len 64]`
//!
//! `--model` is a `bert2bert init` directory. For each bucket size (0: one all-reduce after
//! backward) every rank trains `--steps` steps from the same start. Rank 0's numbers after the
//! first (warm-up) step: median and total step time, median wait from the end of backward until
//! the gradients were reduced (the communication not hidden), and whether the parameters are
//! bitwise those of the first setting.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kernels::{Cpu, Memory};
use model::job::JobSpec;
use worker::Trainer;
use worker::ring::RingCollective;

struct Args {
    model: PathBuf,
    data: PathBuf,
    ranks: usize,
    steps: usize,
    bucket_mb: Vec<f64>,
    batch: usize,
    len: usize,
}

const USAGE: &str = "usage: overlap --model DIR --data FILE [--ranks N] [--steps N] [--bucket-mb MB,MB,..] \
                     [--batch N] [--len N]";

fn parse_args() -> Result<Args, String> {
    let (mut model, mut data) = (None, None);
    let mut a = Args {
        model: PathBuf::new(),
        data: PathBuf::new(),
        ranks: 2,
        steps: 6,
        bucket_mb: vec![0.0, 25.0],
        batch: 8,
        len: 64,
    };
    let mut it = std::env::args().skip(1);
    let count = |s: String, what: &str| -> Result<usize, String> {
        s.parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| format!("{what}: `{s}` is not a positive integer"))
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--data" => data = Some(PathBuf::from(value()?)),
            "--ranks" => a.ranks = count(value()?, "--ranks")?,
            "--steps" => a.steps = count(value()?, "--steps")?,
            "--batch" => a.batch = count(value()?, "--batch")?,
            "--len" => a.len = count(value()?, "--len")?,
            "--bucket-mb" => {
                a.bucket_mb = value()?
                    .split(',')
                    .map(|s| s.parse::<f64>().ok().filter(|v| *v >= 0.0).ok_or(format!("--bucket-mb: `{s}`")))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    a.model = model.ok_or("--model is required")?;
    a.data = data.ok_or("--data is required")?;
    if a.steps < 2 {
        return Err("--steps must be at least 2 (the first step is a warm-up)".into());
    }
    Ok(a)
}

fn job(a: &Args, ckpt: &std::path::Path) -> Result<JobSpec, String> {
    let text = format!(
        r#"
name: overlap
model: {{ init: {model} }}
data: {{ train: {data}, max_source_len: {len}, max_target_len: {len} }}
training: {{ steps: {steps}, global_batch: {batch}, lr: 1.0e-4, warmup_steps: 1, precision: fp32, seed: 3 }}
checkpoint: {{ dir: {ckpt}, every_steps: 1000000, keep: 1 }}
resources: {{ workers: {ranks}, device: cpu }}
"#,
        model = a.model.display(),
        data = a.data.display(),
        len = a.len,
        steps = a.steps,
        batch = a.batch,
        ckpt = ckpt.display(),
        ranks = a.ranks,
    );
    JobSpec::from_str(&text, &std::env::current_dir().map_err(|e| e.to_string())?.join("overlap.yaml"))
        .map_err(|e| e.to_string())
}

/// Step times, waits for communication (ms), final parameters, bucket count.
type RankRun = (Vec<f64>, Vec<f64>, Vec<f32>, usize);

/// Rank 0's step times and waits for communication after backward (ms), final parameters and
/// bucket count.
fn run(a: &Args, bucket_mb: f64) -> Result<RankRun, String> {
    let tmp = std::env::temp_dir().join(format!("b2b-overlap-{}-{bucket_mb}", std::process::id()));
    let listeners: Vec<_> = (0..a.ranks)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let peers: Vec<_> =
        listeners.iter().map(|l| l.local_addr().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let results: Vec<Result<RankRun, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, tmp) = (&peers, &tmp);
                s.spawn(move || -> Result<RankRun, String> {
                    let spec = job(a, &tmp.join(rank.to_string()))?;
                    let ring = RingCollective::connect(rank, a.ranks, 1, listener, peers, Duration::from_secs(300))
                        .map_err(|e| e.to_string())?;
                    let (mut t, _) = Trainer::new(&Cpu, &ring, spec).map_err(|e| e.to_string())?;
                    t.grad_bucket_mb = bucket_mb;
                    let (mut ms, mut wait) = (Vec::new(), Vec::new());
                    for _ in 0..a.steps {
                        ms.push(t.step().map_err(|e| e.to_string())?.step_ms);
                        wait.push(t.comm_wait_ms);
                    }
                    let n = t.net.table.storage_len;
                    let params = Cpu.download(Cpu.view(&t.net.params, 0..n)).map_err(|e| e.to_string())?;
                    Ok((ms, wait, params, t.grad_bucket_count()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into()))).collect()
    });
    let _ = std::fs::remove_dir_all(&tmp);
    results.into_iter().next().ok_or("no ranks")?
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut first: Option<Vec<f32>> = None;
    println!(
        "{:>10} {:>8} {:>10} {:>10} {:>10} {:>6}  steps (ms)",
        "bucket MB", "buckets", "step ms", "total ms", "wait ms", "same"
    );
    for &mb in &a.bucket_mb {
        let (ms, wait, params, buckets) = match run(&a, mb) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: bucket {mb} MB: {e}");
                return ExitCode::from(1);
            }
        };
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let total: f64 = ms[1..].iter().sum();
        let same = match &first {
            None => {
                first = Some(params);
                "-".to_string()
            }
            Some(p) => (p.iter().zip(&params).all(|(x, y)| x.to_bits() == y.to_bits())).to_string(),
        };
        let all: Vec<String> = ms.iter().map(|m| format!("{m:.0}")).collect();
        let (step, waited) = (median(&ms[1..]), median(&wait[1..]));
        println!("{mb:>10} {buckets:>8} {step:>10.1} {total:>10.0} {waited:>10.1} {same:>6}  {}", all.join(" "));
    }
    ExitCode::SUCCESS
}
