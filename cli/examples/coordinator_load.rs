//! Load test of the coordinator's worker API: one `bert2bert coordinator` process and N
//! simulated workers in this process (real gRPC clients, no model), in K jobs of N/K workers
//! each (default K = N: one-worker jobs, the worst case for gang formation), stepping at a
//! GPU-like rate and reporting progress as the agent does.
//!
//!   cargo build --release -p bert2bert --bin bert2bert --example coordinator_load
//!   target/release/examples/coordinator_load [--workers 10,100,1000] [--jobs K] [--rate 10] [--secs 10] [--mode latest|every-step]
//!
//! Modes: `latest` is the agent's way (agent/src/report.rs): the step hands its progress to
//! a watch channel and a background task sends the newest value at most every 250 ms;
//! `every-step` is the old way: each step waits for its own ReportProgress RPC. Heartbeats run
//! as the agent sends them. Printed per N: how long the gangs took to form (from the first
//! GetAssignment until every worker has its assignment), reports sent per second in the steady
//! state, ReportProgress and Heartbeat latency p50/p99 separately for calls sent during
//! formation and after it (the steady state), the coordinator's CPU over the whole run (from
//! /proc, user and system time over wall time) and the time a step spends on reporting
//! (p50/p99), which is what the training thread would lose. The steady state lasts --secs after formation. Loopback only;
//! every loop is bounded: formation may take at most FORMATION_LIMIT, after which the workers
//! still waiting give up and the run is reported as not formed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::{Mutex, watch};
use tonic::transport::Channel;

const TOKEN: &str = "coordinator-load-token";

/// The longest the gangs may take to form before the run gives up on the workers still waiting.
const FORMATION_LIMIT: Duration = Duration::from_secs(120);

struct Args {
    workers: Vec<usize>,
    /// How many jobs the workers are split into; `None`: one job per worker.
    jobs: Option<usize>,
    rate: f64,
    secs: f64,
    every_step: bool,
}

const USAGE: &str = "usage: coordinator_load [--workers N,N,...] [--jobs K] [--rate STEPS_PER_S] [--secs S] \
                     [--mode latest|every-step]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args { workers: vec![10, 100, 1000], jobs: None, rate: 10.0, secs: 10.0, every_step: false };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let flag = pair[0].as_str();
        let v = pair.get(1).ok_or_else(|| format!("{flag}: needs a value"))?;
        let bad = |what: &str| format!("{flag}: `{v}` is not {what}");
        match flag {
            "--workers" => {
                a.workers =
                    v.split(',').map(|n| n.parse().map_err(|_| bad("a list of counts"))).collect::<Result<_, _>>()?
            }
            "--jobs" => a.jobs = Some(v.parse().map_err(|_| bad("a count"))?),
            "--rate" => a.rate = v.parse().map_err(|_| bad("a number"))?,
            "--secs" => a.secs = v.parse().map_err(|_| bad("a number"))?,
            "--mode" => {
                a.every_step = match v.as_str() {
                    "every-step" => true,
                    "latest" => false,
                    _ => return Err(bad("`latest` or `every-step`")),
                }
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if !a.workers.iter().all(|&n| (1..=5000).contains(&n)) {
        return Err("--workers: 1 to 5000 each".into());
    }
    if let Some(k) = a.jobs
        && let Some(n) = a.workers.iter().find(|&&n| k == 0 || n % k != 0)
    {
        return Err(format!("--jobs {k}: must divide every --workers count (not {n})"));
    }
    if !(a.rate > 0.0 && a.rate <= 1000.0 && a.secs > 0.0 && a.secs <= 600.0) {
        return Err("--rate: above 0, at most 1000; --secs: above 0, at most 600".into());
    }
    Ok(a)
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

/// A job of `workers` workers that all must be there to start (min_workers = workers: the
/// coordinator runs with no elastic wait, which would otherwise start it with whoever is idle).
fn job_yaml(i: usize, workers: usize, dir: &std::path::Path) -> String {
    format!(
        "name: load-{i}\nmodel: {{ init: {m} }}\ndata: {{ train: {d} }}\n\
         training: {{ steps: 1000000, global_batch: {workers} }}\ncheckpoint: {{ dir: {c} }}\n\
         resources: {{ workers: {workers}, min_workers: {workers}, device: cpu }}\n",
        m = dir.join("model").display(),
        d = dir.join("train.jsonl").display(),
        c = dir.join(format!("ckpt-{i}")).display(),
    )
}

#[derive(Default)]
struct Samples {
    /// When each ReportProgress or Heartbeat call was sent, and how long it took (ms).
    rpc_ms: Vec<(Instant, f64)>,
    step_overhead_us: Vec<f64>,
    /// Successful ReportProgress calls sent after formation.
    steady_reports: usize,
}

impl Samples {
    fn rpc(&mut self, sent: Instant, ms: f64, report_ok: bool, phase: &Phase) {
        self.rpc_ms.push((sent, ms));
        self.steady_reports += (report_ok && phase.formed_before(sent)) as usize;
    }
}

/// Where the run stands: when the first GetAssignment went out, how many workers have their
/// assignment and when the last one got it. The steady state lasts `secs` after that.
struct Phase {
    n: usize,
    secs: Duration,
    start: Instant,
    first_ask: OnceLock<Instant>,
    assigned: AtomicUsize,
    formed: OnceLock<Instant>,
}

impl Phase {
    fn got_assignment(&self) {
        if self.assigned.fetch_add(1, Ordering::SeqCst) + 1 == self.n {
            let _ = self.formed.set(Instant::now());
        }
    }

    /// When every loop ends: `secs` after formation, or after the formation limit if the gangs
    /// never all formed.
    fn until(&self) -> Instant {
        match self.formed.get() {
            Some(&f) => f + self.secs,
            None => self.start + FORMATION_LIMIT + self.secs,
        }
    }

    fn formed_before(&self, t: Instant) -> bool {
        self.formed.get().is_some_and(|&f| f <= t)
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One simulated worker: register, take its assignment, then step and report until the run ends.
async fn worker(ch: Channel, args: Arc<Args>, phase: Arc<Phase>, out: Arc<Mutex<Samples>>) {
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
        let _ = phase.first_ask.set(Instant::now());
        let r = c.get_assignment(auth(tonic::Request::new(req))).await.expect("GetAssignment").into_inner();
        if let Some(a) = r.assignment {
            phase.got_assignment();
            break a;
        }
        if Instant::now() >= phase.start + FORMATION_LIMIT {
            return; // counted as not formed
        }
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
    let every = Duration::from_millis(reg.heartbeat_interval_ms.max(100));
    let beat = tokio::spawn(heartbeats(c.clone(), hb, every, phase.clone(), out.clone()));
    let (tx, rx) = watch::channel(None::<v1::Progress>);
    let sender =
        (!args.every_step).then(|| tokio::spawn(send_latest(c.clone(), base.clone(), rx, phase.clone(), out.clone())));
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut overhead = Vec::new();
    let mut step = 0u64;
    let mut next = Instant::now();
    while Instant::now() < phase.until() {
        step += 1;
        let p = v1::Progress { step, total_steps: 1_000_000, loss: 1.0, lr: 1e-4, tokens_per_s: 1.0, eta_s: 1.0 };
        let t = Instant::now();
        if args.every_step {
            let req = v1::ReportProgressRequest { progress: Some(p), ..base.clone() };
            let ok = c.report_progress(auth(tonic::Request::new(req))).await.is_ok();
            out.lock().await.rpc(t, t.elapsed().as_secs_f64() * 1e3, ok, &phase);
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
    phase: Arc<Phase>,
    out: Arc<Mutex<Samples>>,
) {
    while rx.changed().await.is_ok() {
        let Some(p) = *rx.borrow_and_update() else { continue };
        let t = Instant::now();
        let req = v1::ReportProgressRequest { progress: Some(p), ..base.clone() };
        let ok = c.report_progress(auth(tonic::Request::new(req))).await.is_ok();
        out.lock().await.rpc(t, t.elapsed().as_secs_f64() * 1e3, ok, &phase);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn heartbeats(
    mut c: WorkerServiceClient<Channel>,
    req: v1::HeartbeatRequest,
    every: Duration,
    phase: Arc<Phase>,
    out: Arc<Mutex<Samples>>,
) {
    while Instant::now() < phase.until() {
        let t = Instant::now();
        let _ = c.heartbeat(auth(tonic::Request::new(req.clone()))).await;
        out.lock().await.rpc(t, t.elapsed().as_secs_f64() * 1e3, false, &phase);
        tokio::time::sleep(every).await;
    }
}

/// The p50 and p99 of `v`.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    (pct(&mut v, 0.5), pct(&mut v, 0.99))
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
    let k = args.jobs.unwrap_or(n);
    let mut jobs = JobServiceClient::new(chans[0].clone());
    for i in 0..k {
        let req = v1::SubmitJobRequest { job_yaml: job_yaml(i, n / k, dir.path()) };
        jobs.submit(auth(tonic::Request::new(req))).await.expect("Submit");
    }
    let out = Arc::new(Mutex::new(Samples::default()));
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let phase = Arc::new(Phase {
        n,
        secs: Duration::from_secs_f64(args.secs),
        start: t0,
        first_ask: OnceLock::new(),
        assigned: AtomicUsize::new(0),
        formed: OnceLock::new(),
    });
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(worker(chans[i % conns].clone(), args.clone(), phase.clone(), out.clone())))
        .collect();
    for t in tasks {
        t.await.expect("worker task");
    }
    let end = Instant::now();
    let wall = (end - t0).as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let _ = coord.kill();
    let _ = coord.wait();
    let o = std::mem::take(&mut *out.lock().await);
    let (formation, steady): (Vec<_>, Vec<_>) = o.rpc_ms.iter().partition(|(sent, _)| !phase.formed_before(*sent));
    let ms = |v: Vec<&(Instant, f64)>| v.into_iter().map(|&(_, ms)| ms).collect::<Vec<f64>>();
    let (nf, ns) = (formation.len(), steady.len());
    let ((f50, f99), (s50, s99)) = (p50_p99(ms(formation)), p50_p99(ms(steady)));
    let (o50, o99) = p50_p99(o.step_overhead_us);
    let formed = match (phase.first_ask.get(), phase.formed.get()) {
        (Some(&a), Some(&f)) => format!("{:.2}", (f - a).as_secs_f64()),
        _ => format!("no ({} of {n})", phase.assigned.load(Ordering::SeqCst)),
    };
    let steady_secs = phase.formed.get().map_or(0.0, |&f| (end.min(f + phase.secs) - f).as_secs_f64());
    println!(
        "{n:>6} {k:>5} {mode:>10} {rate:>6.0} {formed:>9} {nf:>7} {f50:>8.2} {f99:>8.2} {reports:>9.0} {ns:>7} \
         {s50:>8.2} {s99:>8.2} {cpu:>8.0}% {o50:>10.1} {o99:>10.1}",
        mode = if args.every_step { "every-step" } else { "latest" },
        rate = args.rate,
        reports = o.steady_reports as f64 / steady_secs.max(1e-9),
        cpu = 100.0 * cpu / wall,
    );
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("coordinator_load: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "{:>6} {:>5} {:>10} {:>6} {:>9} {:>7} {:>8} {:>8} {:>9} {:>7} {:>8} {:>8} {:>9} {:>10} {:>10}",
        "workers",
        "jobs",
        "mode",
        "step/s",
        "formed s",
        "form n",
        "p50 ms",
        "p99 ms",
        "reports/s",
        "steady n",
        "p50 ms",
        "p99 ms",
        "coord CPU",
        "step p50us",
        "step p99us"
    );
    for &n in &args.workers {
        rt.block_on(run_one(n, args.clone()));
    }
}
