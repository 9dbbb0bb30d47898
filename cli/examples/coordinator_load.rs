//! Load test of the coordinator's worker API: one `bert2bert coordinator` process and N
//! simulated workers in this process (real gRPC clients, no model), each in a one-worker job,
//! stepping at a GPU-like rate and reporting progress as the agent does.
//!
//!   cargo build --release -p bert2bert --examples
//!   target/release/examples/coordinator_load [--workers 10,100,1000] [--rate 10] [--secs 10] [--mode latest|every-step]
//!
//! Modes: `latest` is the agent's way (agent/src/report.rs): the step hands its progress to
//! a watch channel and a background task sends the newest value at most every 250 ms;
//! `every-step` is the old way: each step waits for its own ReportProgress RPC. Heartbeats run
//! as the agent sends them. Printed per N: reports sent per second, RPC latency p50/p99, the
//! coordinator's CPU (from /proc, user + system over wall time) and the time a step spends on
//! reporting (p50/p99), which is what the training thread would lose. Loopback only; every loop
//! is bounded by --secs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::{Mutex, watch};
use tonic::transport::Channel;

const TOKEN: &str = "coordinator-load-token";

struct Args {
    workers: Vec<usize>,
    rate: f64,
    secs: f64,
    every_step: bool,
}

fn parse_args() -> Args {
    let mut a = Args { workers: vec![10, 100, 1000], rate: 10.0, secs: 10.0, every_step: false };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--workers" => a.workers = v.split(',').map(|n| n.parse().expect("--workers N,N,...")).collect(),
            "--rate" => a.rate = v.parse().expect("--rate STEPS_PER_S"),
            "--secs" => a.secs = v.parse().expect("--secs S"),
            "--mode" => a.every_step = v == "every-step",
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.workers.iter().all(|&n| (1..=5000).contains(&n)), "--workers: 1 to 5000 each");
    assert!(a.rate > 0.0 && a.rate <= 1000.0 && a.secs > 0.0 && a.secs <= 600.0, "--rate 0-1000, --secs 0-600");
    a
}

/// The bert2bert binary beside this example's directory (target/<profile>/bert2bert).
fn binary() -> PathBuf {
    if let Ok(b) = std::env::var("BERT2BERT") {
        return b.into();
    }
    let exe = std::env::current_exe().expect("own path");
    exe.parent().and_then(|d| d.parent()).expect("target/<profile>/examples").join("bert2bert")
}

fn start_coordinator(state: &std::path::Path) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(binary())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
        .arg(state)
        .args(["--heartbeat-timeout", "30", "--elastic-wait", "0"])
        .env("BERT2BERT_TOKEN", TOKEN)
        .env("BERT2BERT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("listening on ADDR").to_owned();
    (child, format!("http://{addr}"))
}

/// User + system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15), clock ticks of 10 ms
}

fn auth<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn job_yaml(i: usize, dir: &std::path::Path) -> String {
    format!(
        "name: load-{i}\nmodel: {{ init: {m} }}\ndata: {{ train: {d} }}\n\
         training: {{ steps: 1000000, global_batch: 1 }}\ncheckpoint: {{ dir: {c} }}\n\
         resources: {{ workers: 1, device: cpu }}\n",
        m = dir.join("model").display(),
        d = dir.join("train.jsonl").display(),
        c = dir.join(format!("ckpt-{i}")).display(),
    )
}

#[derive(Default)]
struct Samples {
    rpc_ms: Vec<f64>,
    step_overhead_us: Vec<f64>,
    reports: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One simulated worker: register, take its assignment, then step and report until `until`.
async fn worker(ch: Channel, args: Arc<Args>, until: Instant, out: Arc<Mutex<Samples>>) {
    let mut c = WorkerServiceClient::new(ch);
    let caps = v1::Capabilities { device: "cpu".into(), cpu_threads: 1, ..Default::default() };
    let reg = v1::RegisterWorkerRequest {
        hostname: "load".into(),
        capabilities: Some(caps),
        ring_address: "127.0.0.1:9".into(),
        version: "load".into(),
    };
    let reg = c.register(auth(tonic::Request::new(reg))).await.expect("Register").into_inner();
    let (id, secret) = (reg.worker_id, reg.worker_secret);
    let asg = loop {
        let req = v1::GetAssignmentRequest {
            worker_id: id.clone(),
            wait_ms: 2000,
            worker_secret: secret.clone(),
            ..Default::default()
        };
        let r = c.get_assignment(auth(tonic::Request::new(req))).await.expect("GetAssignment").into_inner();
        if let Some(a) = r.assignment {
            break a;
        }
        assert!(Instant::now() < until, "no assignment before the end");
    };
    let base = v1::ReportProgressRequest {
        worker_id: id.clone(),
        job_id: asg.job_id.clone(),
        attempt: asg.attempt,
        worker_secret: secret.clone(),
        ..Default::default()
    };
    let hb = v1::HeartbeatRequest {
        worker_id: id,
        job_id: asg.job_id,
        attempt: asg.attempt,
        step: 0,
        worker_secret: secret,
    };
    let beat =
        tokio::spawn(heartbeats(c.clone(), hb, Duration::from_millis(reg.heartbeat_interval_ms.max(100)), until));
    let (tx, rx) = watch::channel(None::<v1::Progress>);
    let sender = (!args.every_step).then(|| tokio::spawn(send_latest(c.clone(), base.clone(), rx, out.clone())));
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut overhead = Vec::new();
    let mut step = 0u64;
    let mut next = Instant::now();
    while Instant::now() < until {
        step += 1;
        let p = v1::Progress { step, total_steps: 1_000_000, loss: 1.0, lr: 1e-4, tokens_per_s: 1.0, eta_s: 1.0 };
        let t = Instant::now();
        if args.every_step {
            let req = v1::ReportProgressRequest { progress: Some(p), ..base.clone() };
            let ok = c.report_progress(auth(tonic::Request::new(req))).await.is_ok();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let mut o = out.lock().await;
            o.rpc_ms.push(ms);
            o.reports += ok as usize;
        } else {
            tx.send_replace(Some(p));
        }
        overhead.push(t.elapsed().as_secs_f64() * 1e6);
        next += period;
        tokio::time::sleep_until(next.into()).await;
    }
    drop(tx);
    if let Some(s) = sender {
        let _ = s.await;
    }
    let _ = beat.await;
    out.lock().await.step_overhead_us.extend(overhead);
}

async fn send_latest(
    mut c: WorkerServiceClient<Channel>,
    base: v1::ReportProgressRequest,
    mut rx: watch::Receiver<Option<v1::Progress>>,
    out: Arc<Mutex<Samples>>,
) {
    while rx.changed().await.is_ok() {
        let Some(p) = *rx.borrow_and_update() else { continue };
        let t = Instant::now();
        let req = v1::ReportProgressRequest { progress: Some(p), ..base.clone() };
        let ok = c.report_progress(auth(tonic::Request::new(req))).await.is_ok();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        {
            let mut o = out.lock().await;
            o.rpc_ms.push(ms);
            o.reports += ok as usize;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn heartbeats(mut c: WorkerServiceClient<Channel>, req: v1::HeartbeatRequest, every: Duration, until: Instant) {
    while Instant::now() < until {
        let _ = c.heartbeat(auth(tonic::Request::new(req.clone()))).await;
        tokio::time::sleep(every).await;
    }
}

async fn run_one(n: usize, args: Arc<Args>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, url) = start_coordinator(&dir.path().join("state"));
    let pid = coord.id();
    // A few connections shared by many workers (HTTP/2 multiplexes), as an ingress would.
    let conns = n.clamp(1, 64);
    let mut chans = Vec::new();
    for _ in 0..conns {
        chans.push(Channel::from_shared(url.clone()).unwrap().connect().await.expect("connect"));
    }
    let mut jobs = JobServiceClient::new(chans[0].clone());
    for i in 0..n {
        let req = v1::SubmitJobRequest { job_yaml: job_yaml(i, dir.path()) };
        jobs.submit(auth(tonic::Request::new(req))).await.expect("Submit");
    }
    let until = Instant::now() + Duration::from_secs_f64(args.secs);
    let out = Arc::new(Mutex::new(Samples::default()));
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let tasks: Vec<_> =
        (0..n).map(|i| tokio::spawn(worker(chans[i % conns].clone(), args.clone(), until, out.clone()))).collect();
    for t in tasks {
        t.await.expect("worker task");
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let _ = coord.kill();
    let _ = coord.wait();
    let mut o = out.lock().await;
    let reports = o.reports as f64 / wall;
    let (p50, p99) = (pct(&mut o.rpc_ms, 0.5), pct(&mut o.rpc_ms, 0.99));
    let (s50, s99) = (pct(&mut o.step_overhead_us, 0.5), pct(&mut o.step_overhead_us, 0.99));
    println!(
        "{n:>6} {mode:>10} {rate:>6.0} {reports:>10.0} {p50:>9.2} {p99:>9.2} {cpu:>8.0}% {s50:>12.1} {s99:>12.1}",
        mode = if args.every_step { "every-step" } else { "latest" },
        rate = args.rate,
        cpu = 100.0 * cpu / wall,
    );
}

fn main() {
    let args = Arc::new(parse_args());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "{:>6} {:>10} {:>6} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "workers", "mode", "step/s", "reports/s", "p50 ms", "p99 ms", "coord CPU", "step p50 us", "step p99 us"
    );
    for &n in &args.workers {
        rt.block_on(run_one(n, args.clone()));
    }
}
