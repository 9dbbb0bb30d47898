//! `bert2bert worker`: a worker agent. It registers with the coordinator, heartbeats in the
//! background, polls for an assignment, joins the CPU ring of its gang, trains its rank, and
//! reports progress, checkpoints and the outcome; then it polls again.
//!
//! The gRPC client runs on a tokio runtime made here; the trainer runs synchronously on the
//! main thread, which calls into the runtime with `block_on` to report.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::job::{JobModelExt, JobSpec};
use proto::v1;
use proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use worker::ring::RingCollective;
use worker::tensorboard::{TrainLog, recording};
use worker::{Event, Trainer};

use crate::remote::{Bearer, bearer, channel, status_error};
use crate::{CliError, CliResult};

mod nccl;
mod report;
mod retry;

#[derive(clap::Args)]
#[command(after_help = "\
Authentication: the worker token from --token-file, else BERT2BERT_WORKER_TOKEN, else
BERT2BERT_TOKEN. The worker runs until it is stopped; a failed job is reported and it polls again.

SIGTERM or SIGINT: the worker finishes its current training step (rank 0 then writes and
commits a checkpoint), reports the attempt failed with \"worker shutting down (SIGTERM)\" so that
the coordinator re-forms the gang without it, deregisters, and exits 0. A second signal exits at
once (1).

Reaching the coordinator: a worker started before its coordinator retries with exponential backoff
(0.2 s doubling to 10 s, with jitter), logging each retry, until --connect-timeout (default: for
ever); it then exits 1 naming the address. A worker that loses its coordinator later retries the
same way. Register returns a secret that the worker sends with each later call.

Path policy: with --allow-data/--allow-models/--allow-checkpoints/--allow-logs (or --allow-root),
an assignment naming a path outside its roots (symlinks resolved) is refused before anything is
opened, and the job fails with a reason naming the key.")]
pub struct Args {
    /// The coordinator, e.g. http://10.0.0.5:7070 (a bare HOST:PORT means http).
    #[arg(long, env = "BERT2BERT_COORDINATOR", value_name = "URL")]
    coordinator: String,
    /// File holding the worker bearer token (first line).
    #[arg(long, value_name = "F")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// `cpu`, or `cuda[:N]` for jobs with `device: cuda` (NCCL between the ranks).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Where the CPU ring listens for the left neighbour; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "HOST:PORT")]
    ring_listen: String,
    /// The address peers dial to reach this worker's ring (its port is the listening port);
    /// required when --ring-listen is a wildcard such as 0.0.0.0 (e.g. a pod IP in Kubernetes).
    #[arg(long, env = "BERT2BERT_RING_ADVERTISE", value_name = "HOST")]
    ring_advertise: Option<String>,
    /// Seconds a collective (or forming the ring) may take before a peer counts as dead; on
    /// cuda, also how long a step waits for its NCCL collectives before aborting them.
    #[arg(long, default_value_t = 60.0, value_name = "S")]
    collective_timeout: f64,
    /// Exit when stdin reaches end of file (`train --workers N` uses it so that its workers do
    /// not outlive it, even when it is killed).
    #[arg(long, hide = true)]
    exit_on_stdin_close: bool,
    /// Give up (exit 1) if the coordinator cannot be reached and registered with within S
    /// seconds of starting. Default: keep trying.
    #[arg(long, value_name = "S")]
    connect_timeout: Option<f64>,
    #[command(flatten)]
    policy: crate::serve::PolicyArgs,
}

/// Who this worker is to the coordinator: its id and the secret Register gave with it.
#[derive(Clone, Default)]
pub(crate) struct Me {
    id: String,
    secret: String,
}

type Client = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// What the heartbeat task reports and can abort.
#[derive(Default)]
struct Current {
    me: Me,
    /// Where assignments may point (`--allow-*`).
    policy: Arc<model::policy::PathPolicy>,
    job: Option<(String, u32)>,
    step: u64,
    ring: Option<Arc<RingCollective>>,
    /// `--device cuda:N`: the device index and its backend, opened once at start.
    cuda: Option<(usize, Arc<crate::device::Cuda>)>,
    /// The coordinator said STOP (or forgot us): abandon the attempt.
    stop: bool,
    reregister: bool,
    /// Set by the first SIGTERM/SIGINT: finish the step, checkpoint (rank 0), report, exit 0.
    shutdown: Arc<AtomicBool>,
}

pub fn run(a: Args) -> CliResult {
    let device: crate::device::Device = a.device.parse().map_err(CliError::usage)?;
    // A machine without a driver is told so (exit 2) before the worker registers.
    let cuda = nccl::open(device)?;
    if !(a.collective_timeout > 0.0 && a.collective_timeout.is_finite()) {
        return Err(CliError::usage("--collective-timeout must be a positive number of seconds"));
    }
    let connect_timeout = match a.connect_timeout {
        Some(s) if (0.0..1e9).contains(&s) => Some(Duration::from_secs_f64(s)),
        Some(_) => return Err(CliError::usage("--connect-timeout must be a number of seconds, 0 or more")),
        None => None,
    };
    let policy = Arc::new(a.policy.policy()?);
    let token = match crate::serve::read_token(a.token_file.as_ref(), "BERT2BERT_WORKER_TOKEN")? {
        Some(t) => Some(t),
        None if a.token_file.is_none() => crate::serve::read_token(None, "BERT2BERT_TOKEN")?,
        None => None,
    };
    if a.exit_on_stdin_close {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            tracing::info!("stdin closed: exiting");
            std::process::exit(0);
        });
    }
    let listen: SocketAddr = a
        .ring_listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| CliError::usage(format!("--ring-listen {}: not a HOST:PORT address", a.ring_listen)))?;
    let listener = TcpListener::bind(listen)?;
    let ring_address = advertised_ring_address(listener.local_addr()?, a.ring_advertise.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let current = Arc::new(Mutex::new(Current { cuda, policy, ..Current::default() }));
    let shutdown = take(&current, |c| c.shutdown.clone());
    rt.spawn(watch_signals(rt.block_on(async { ShutdownSignals::new() })?, shutdown.clone()));
    let deadline = connect_timeout.map(|t| Instant::now() + t);
    let client: Client = WorkerServiceClient::with_interceptor(connect(&rt, &a, deadline)?, bearer(token)?);
    let interval = register(&rt, &client, ring_address, &current, deadline)?;
    rt.spawn(heartbeats(client.clone(), current.clone(), interval));
    let timeout = Duration::from_secs_f64(a.collective_timeout);
    let mut backoff = retry::Backoff::default();
    loop {
        if shutdown.load(Ordering::SeqCst) {
            tracing::info!("shutting down on a signal");
            deregister(&rt, &client, &take(&current, |c| c.me.clone()));
            return Ok(());
        }
        if take(&current, |c| std::mem::take(&mut c.reregister)) {
            register(&rt, &client, ring_address, &current, None)?;
        }
        let me = take(&current, |c| c.me.clone());
        let req = v1::GetAssignmentRequest {
            worker_id: me.id,
            wait_ms: 2_000,
            worker_secret: me.secret,
            ..Default::default()
        };
        let got = rt.block_on(client.clone().get_assignment(req));
        let assignment = match got {
            Ok(r) => {
                backoff.reset();
                r.into_inner().assignment
            }
            // The coordinator no longer knows our secret (its state directory was replaced), or
            // no longer takes our token: registering again either recovers or fails for good.
            Err(s) if s.code() == Code::Unauthenticated => {
                tracing::warn!("GetAssignment: {}; registering again", s.message());
                take(&current, |c| c.reregister = true);
                continue;
            }
            Err(s) if s.code() == Code::PermissionDenied => {
                return Err(status_error(s));
            }
            Err(s) => {
                let wait = backoff.next_delay();
                tracing::warn!("GetAssignment: {}; retry {} in {wait:.1?}", s.message(), backoff.retries);
                std::thread::sleep(wait);
                continue;
            }
        };
        let Some(asg) = assignment else { continue };
        attempt(&rt, &client, &listener, &current, asg, timeout);
    }
}

/// A channel to the coordinator, retried with backoff until `deadline` (`None`: for ever).
/// A bad URL or TLS setting is a usage error at once.
fn connect(rt: &tokio::runtime::Runtime, a: &Args, deadline: Option<Instant>) -> CliResult<Channel> {
    let mut backoff = retry::Backoff::default();
    loop {
        match rt.block_on(channel(&a.coordinator, &a.tls)) {
            Ok(ch) => return Ok(ch),
            Err(e) if e.code == 2 => return Err(e),
            Err(e) => {
                let Some(wait) = retry::wait_within(&mut backoff, deadline) else {
                    return Err(gave_up(&a.coordinator, e));
                };
                tracing::warn!("{:#}; retry {} in {wait:.1?}", e.error, backoff.retries);
                std::thread::sleep(wait);
            }
        }
    }
}

fn gave_up(url: &str, e: CliError) -> CliError {
    CliError {
        code: 1,
        error: e.error.context(format!("gave up reaching the coordinator at {url} (--connect-timeout)")),
    }
}

/// The ring address registered with the coordinator: `advertise` (an IP, or a name resolved
/// here) with the listening port, else the listening address itself, which must then be one a
/// peer can dial (a wildcard like 0.0.0.0 is not).
fn advertised_ring_address(listening: SocketAddr, advertise: Option<&str>) -> CliResult<SocketAddr> {
    let Some(host) = advertise.map(str::trim) else {
        if listening.ip().is_unspecified() {
            return Err(CliError::usage(format!(
                "--ring-listen {listening} listens on every interface: pass --ring-advertise HOST, the \
                 address peers reach this worker at (in Kubernetes, the pod IP)"
            )));
        }
        return Ok(listening);
    };
    let bad = |why: String| CliError::usage(format!("--ring-advertise {host}: {why}"));
    let ip = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => (host, listening.port())
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve it ({e})")))?
            .next()
            .ok_or_else(|| bad("resolves to no address".into()))?
            .ip(),
    };
    if ip.is_unspecified() {
        return Err(bad("a wildcard address cannot be dialled; give this worker's own address".into()));
    }
    Ok(SocketAddr::new(ip, listening.port()))
}

/// SIGTERM and SIGINT streams, made on the runtime before anything else so that no signal
/// meets the default action (death) once the agent runs.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }
}

/// The first signal asks for a graceful stop (polled between training steps); a second one
/// exits at once.
async fn watch_signals(mut s: ShutdownSignals, shutdown: Arc<AtomicBool>) {
    loop {
        tokio::select! {
            _ = s.term.recv() => {}
            _ = s.int.recv() => {}
        }
        if shutdown.swap(true, Ordering::SeqCst) {
            eprintln!("second signal: exiting now");
            std::process::exit(1);
        }
        tracing::warn!("signal received: finishing the current step, then leaving (signal again to exit now)");
    }
}

/// Tells the coordinator this worker is gone, so that it need not wait for the heartbeat
/// timeout. Best effort: the worker leaves anyway.
fn deregister(rt: &tokio::runtime::Runtime, client: &Client, me: &Me) {
    let req = v1::DeregisterRequest {
        worker_id: me.id.clone(),
        reason: coordinator::scheduler::SHUTDOWN_REASON.to_owned(),
        worker_secret: me.secret.clone(),
    };
    let mut client = client.clone();
    // The timer must be made inside the runtime.
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), client.deregister(req)).await }) {
        Ok(Ok(_)) => tracing::info!("deregistered"),
        Ok(Err(s)) => tracing::warn!("Deregister: {}", s.message()),
        Err(_) => tracing::warn!("Deregister: no answer within 5 s"),
    }
}

fn shutdown_error() -> CliError {
    CliError { code: 1, error: anyhow::anyhow!("{}", coordinator::scheduler::SHUTDOWN_REASON) }
}

fn take<T>(current: &Mutex<Current>, f: impl FnOnce(&mut Current) -> T) -> T {
    let mut c = current.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut c)
}

/// Registers and returns the heartbeat interval. An unreachable coordinator is retried with
/// backoff until `deadline` (`None`: for ever); a refusal (wrong token, bad field) is final.
fn register(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    ring_address: SocketAddr,
    current: &Mutex<Current>,
    deadline: Option<Instant>,
) -> CliResult<Duration> {
    let caps = v1::Capabilities {
        device: "cpu".into(),
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        ..Default::default()
    };
    let caps = take(current, |c| nccl::capabilities(c.cuda.as_ref(), caps));
    let req = v1::RegisterWorkerRequest {
        hostname: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        capabilities: Some(caps),
        ring_address: ring_address.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut backoff = retry::Backoff::default();
    let r = loop {
        match rt.block_on(client.clone().register(req.clone())) {
            Ok(r) => break r.into_inner(),
            Err(s) if !retryable(s.code()) => return Err(status_error(s)),
            Err(s) => {
                let Some(wait) = retry::wait_within(&mut backoff, deadline) else {
                    return Err(CliError {
                        code: 1,
                        error: anyhow::anyhow!("Register: {}: gave up (--connect-timeout)", s.message()),
                    });
                };
                tracing::warn!("Register: {}; retry {} in {wait:.1?}", s.message(), backoff.retries);
                std::thread::sleep(wait);
            }
        }
    };
    tracing::info!(worker = %r.worker_id, ring = %ring_address, "registered");
    take(current, |c| c.me = Me { id: r.worker_id, secret: r.worker_secret });
    Ok(Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 60_000)))
}

/// Whether a failed call may succeed when tried again (the coordinator is down or restarting),
/// rather than being a refusal that will not change.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

async fn heartbeats(mut client: Client, current: Arc<Mutex<Current>>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let req = take(&current, |c| {
            let (job_id, attempt) = c.job.clone().unwrap_or_default();
            let (worker_id, worker_secret) = (c.me.id.clone(), c.me.secret.clone());
            v1::HeartbeatRequest { worker_id, job_id, attempt, step: c.step, worker_secret }
        });
        let busy = !req.job_id.is_empty();
        match client.heartbeat(req).await.map(|r| r.into_inner().command()) {
            Ok(v1::WorkerCommand::Stop) if busy => take(&current, |c| {
                c.stop = true;
                if let Some(r) = &c.ring {
                    r.abort();
                }
            }),
            Ok(v1::WorkerCommand::Reregister) => take(&current, |c| c.reregister = true),
            // A coordinator on a new state directory no longer knows our secret.
            Err(s) if s.code() == Code::Unauthenticated && s.message().starts_with("worker_secret") => {
                tracing::warn!("heartbeat: {}; registering again", s.message());
                take(&current, |c| c.reregister = true);
            }
            Ok(_) => {}
            Err(s) => tracing::warn!("heartbeat: {}", s.message()),
        }
    }
}

/// Runs one assignment to its end and reports the outcome; never fails (a failure is reported).
fn attempt(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    listener: &TcpListener,
    current: &Arc<Mutex<Current>>,
    asg: v1::Assignment,
    timeout: Duration,
) {
    let me = take(current, |c| {
        c.job = Some((asg.job_id.clone(), asg.attempt));
        c.step = asg.resume_step;
        c.stop = false;
        c.me.clone()
    });
    tracing::info!(job = %asg.job_id, attempt = asg.attempt, rank = asg.rank, world = asg.world_size, "assigned");
    let result = train(rt, client, listener, current, &asg, &me, timeout);
    let (stopped, step, shutdown) = take(current, |c| {
        c.job = None;
        c.ring = None;
        (std::mem::take(&mut c.stop), c.step, c.shutdown.load(Ordering::SeqCst))
    });
    // Leaving on a signal: say so whatever else failed, so that the coordinator drops this worker.
    let result = if shutdown && result.is_err() { Err(shutdown_error()) } else { result };
    let (job_id, attempt) = (asg.job_id.clone(), asg.attempt);
    let report = match result {
        Ok(()) => {
            tracing::info!(job = %job_id, step, "attempt done");
            let (worker_id, worker_secret) = (me.id, me.secret);
            let req = v1::ReportDoneRequest { worker_id, job_id, attempt, step, worker_secret, ..Default::default() };
            rt.block_on(client.clone().report_done(req)).map(|_| ())
        }
        Err(e) => {
            let reason = format!("{:#}", e.error);
            // Exit-code-2 errors are the job's fault (a bad key, path or data file, a path outside
            // the allowed roots): another attempt would fail alike.
            let input_error = e.code == 2 && !(stopped || shutdown);
            if stopped || shutdown {
                tracing::info!(job = %job_id, step, "attempt stopped: {reason}");
            } else {
                tracing::error!(job = %job_id, "attempt failed: {reason}");
            }
            let (worker_id, worker_secret) = (me.id, me.secret);
            let req = v1::ReportFailedRequest { worker_id, job_id, attempt, step, reason, worker_secret, input_error };
            rt.block_on(client.clone().report_failed(req)).map(|_| ())
        }
    };
    if let Err(s) = report {
        tracing::warn!("reporting the outcome: {}", s.message());
    }
}

fn commit_checkpoint(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    asg: &v1::Assignment,
    me: &Me,
    step: u64,
    dir: &Path,
) {
    let req = v1::CommitCheckpointRequest {
        worker_id: me.id.clone(),
        worker_secret: me.secret.clone(),
        job_id: asg.job_id.clone(),
        attempt: asg.attempt,
        step,
        path: dir.display().to_string(),
        manifest_sha256: String::new(),
    };
    if let Err(s) = rt.block_on(client.clone().commit_checkpoint(req)) {
        tracing::warn!("CommitCheckpoint: {}", s.message());
    }
}

fn train(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    listener: &TcpListener,
    current: &Arc<Mutex<Current>>,
    asg: &v1::Assignment,
    me: &Me,
    timeout: Duration,
) -> CliResult {
    let shutdown = take(current, |c| c.shutdown.clone());
    if shutdown.load(Ordering::SeqCst) {
        return Err(shutdown_error());
    }
    let spec = JobSpec::from_str(&asg.job_yaml, Path::new("assignment.job_yaml"))?;
    check_paths(&take(current, |c| c.policy.clone()), &spec, asg)?;
    // Submit checks lengths against the model only when the coordinator can read it; without
    // this, a length past the model's positions dies at the first long example, every attempt.
    spec.check_against_model()?;
    if spec.resources.device == model::job::Device::Cuda {
        return nccl::train(rt, client, current, asg, me, spec, timeout);
    }
    let peers = asg
        .ring_peers
        .iter()
        .map(|p| p.parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError { code: 1, error: anyhow::anyhow!("assignment.ring_peers: {e}") })?;
    let ring = RingCollective::connect(
        asg.rank as usize,
        asg.world_size as usize,
        asg.ring_token,
        listener.try_clone()?,
        &peers,
        timeout,
    )?;
    let ring = Arc::new(ring);
    take(current, |c| c.ring = Some(ring.clone()));
    run_trainer(rt, client, current, asg, me, (&kernels::Cpu, &*ring, spec, timeout), (&shutdown, &|| ring.abort()))
}

/// The worker's own check of where the job points (`--allow-*`), with symlinks resolved,
/// before anything is opened: a coordinator's lexical check cannot see this filesystem. The
/// error (exit code 2: the job fails without retries) names the key, never a file's contents.
fn check_paths(policy: &model::policy::PathPolicy, spec: &JobSpec, asg: &v1::Assignment) -> CliResult {
    use model::policy::{PathKind, resolve};
    policy.check_resolved(spec)?;
    if !asg.resume_checkpoint.is_empty() {
        let (origin, key) = (Path::new("assignment"), "resume_checkpoint");
        policy.check_path(origin, key, PathKind::Checkpoints, Path::new(&asg.resume_checkpoint), resolve)?;
    }
    Ok(())
}

/// Trains the rank on `backend` with `collective` until the job ends or is stopped; `timeout`
/// (--collective-timeout) bounds each step's wait for its collectives. `halt` is the trainer's
/// stop flag (checked between steps; a SIGTERM sets it too); `abort` makes a STOP from the
/// coordinator take effect.
fn run_trainer<B: kernels::Backend + Sync, C: kernels::collective::Collective<B> + Sync>(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    current: &Arc<Mutex<Current>>,
    asg: &v1::Assignment,
    me: &Me,
    (backend, collective, spec, timeout): (&B, &C, JobSpec, Duration),
    (halt, abort): (&Arc<AtomicBool>, &dyn Fn()),
) -> CliResult {
    let shutdown = take(current, |c| c.shutdown.clone());
    // Checkpoints name the coordinator's job id: another job sharing checkpoint.dir is refused.
    let owner = worker::state::JobOwner { name: spec.name.clone(), id: Some(asg.job_id.clone()) };
    let (mut trainer, resumed) = Trainer::new_owned(backend, collective, spec, owner)?;
    trainer.stop = Some(halt.clone());
    // A step fails (and the attempt with it) instead of hanging when a peer dies mid-collective.
    trainer.collective_timeout = timeout;
    // The trainer resumes from the newest valid checkpoint on disk, which may be past the
    // coordinator's last committed one (a commit lost with a crash): report from there, or a
    // finished job would be reported done at the older step.
    take(current, |c| c.step = trainer.step);
    // A checkpoint newer than the coordinator knows (its commit was lost in a crash of rank 0 or
    // of the coordinator): commit it, so that the job's committed step is the one resumed from.
    // (Not a `checkpoint.resume_from` outside checkpoint.dir: that one is another job's.)
    if let Some(Event::Resumed { step, from }) = &resumed
        && asg.rank == 0
        && *step > asg.resume_step
        && from.starts_with(&trainer.job.checkpoint.dir)
    {
        commit_checkpoint(rt, client, asg, me, *step, from);
    }
    let at = |c: &Mutex<Current>| take(c, |c| c.stop);
    if at(current) {
        return Err(CliError { code: 1, error: anyhow::anyhow!("stopped by the coordinator") });
    }
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let base = v1::ReportProgressRequest {
        worker_id: me.id.clone(),
        worker_secret: me.secret.clone(),
        job_id: asg.job_id.clone(),
        attempt: asg.attempt,
        ..Default::default()
    };
    let stop_flag = AtomicBool::new(false);
    // Per-step progress goes through a background sender: the step never waits on the RPC.
    let interval = if asg.rank == 0 { report::RANK0_INTERVAL } else { report::OTHER_INTERVAL };
    let reporter = report::Reporter::start(rt, client.clone(), base.clone(), interval);
    // An evaluation is reported with the progress of the step that ran it.
    let mut last_progress = v1::Progress::default();
    // Rank 0 alone writes the job's loss curves; a log dir it cannot write costs the curves only.
    let mut curves = (asg.rank == 0)
        .then(|| TrainLog::create(&trainer.job.logging.dir, trainer.step, asg.world_size as usize))
        .and_then(|made| made.map_err(|e| tracing::warn!("logging.dir: no TensorBoard events: {e}")).ok());
    let mut on_event = recording(curves.as_mut(), |e| match e {
        Event::Step(s) => {
            if shutdown.load(Ordering::SeqCst) {
                halt.store(true, Ordering::SeqCst);
            }
            take(current, |c| c.step = s.step);
            tokens += s.tokens * asg.world_size as usize;
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            let done = s.step.saturating_sub(asg.resume_step).max(1) as f64;
            let progress = v1::Progress {
                step: s.step,
                total_steps: s.total_steps,
                loss: s.loss as f32,
                lr: s.lr,
                tokens_per_s: tokens as f64 / secs,
                eta_s: secs / done * s.total_steps.saturating_sub(s.step) as f64,
            };
            last_progress = progress;
            reporter.publish(progress);
            // A STOP that came back with an earlier report takes effect here, between steps.
            if reporter.stop_requested() && !stop_flag.swap(true, Ordering::SeqCst) {
                take(current, |c| c.stop = true);
                abort();
            }
        }
        Event::Checkpoint { step, dir } => commit_checkpoint(rt, client, asg, me, *step, dir),
        Event::Eval { step, result } => {
            tracing::info!(step, loss = result.loss, "evaluation");
            if asg.rank == 0 {
                let eval = v1::EvalMetrics {
                    step: *step,
                    loss: result.loss as f32,
                    bleu: result.bleu.map(|b| b as f32),
                    rouge1: result.rouge.as_ref().map(|r| r.rouge1 as f32),
                    rouge2: result.rouge.as_ref().map(|r| r.rouge2 as f32),
                    rouge_l: result.rouge.as_ref().map(|r| r.rouge_l as f32),
                };
                let req = v1::ReportProgressRequest { progress: Some(last_progress), eval: Some(eval), ..base.clone() };
                if let Err(s) = rt.block_on(client.clone().report_progress(req)) {
                    tracing::warn!("ReportProgress (evaluation): {}", s.message());
                }
            }
        }
        Event::Resumed { .. } => {}
    });
    let ran = trainer.run(None, 0, &mut on_event);
    drop(on_event);
    // The last progress is delivered; a STOP that comes back now changes nothing: training
    // has already ended, and how it ended is reported next.
    reporter.finish(rt);
    ran?;
    if stop_flag.load(Ordering::SeqCst) {
        return Err(CliError { code: 1, error: anyhow::anyhow!("stopped by the coordinator") });
    }
    if shutdown.load(Ordering::SeqCst) && trainer.step < trainer.job.training.steps {
        return Err(shutdown_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::advertised_ring_address;
    use std::net::SocketAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn advertised(listening: SocketAddr, host: Option<&str>) -> SocketAddr {
        advertised_ring_address(listening, host).unwrap_or_else(|e| panic!("{host:?}: {}", e.error))
    }

    #[test]
    fn advertise_keeps_the_listening_port_and_needs_a_dialable_host() {
        let wildcard = addr("0.0.0.0:7071");
        assert_eq!(advertised(wildcard, Some("10.1.2.3")), addr("10.1.2.3:7071"));
        assert_eq!(advertised(addr("[::]:7071"), Some("[fd00::5]")), addr("[fd00::5]:7071"));
        assert_eq!(advertised(addr("127.0.0.1:9"), None), addr("127.0.0.1:9"));
        assert_eq!(advertised(wildcard, Some("localhost")).port(), 7071);
        let no_host = advertised_ring_address(wildcard, None).unwrap_err();
        assert_eq!(no_host.code, 2);
        assert!(no_host.error.to_string().contains("--ring-advertise"), "{}", no_host.error);
        for bad in ["0.0.0.0", "no-such-host.invalid"] {
            let e = advertised_ring_address(wildcard, Some(bad)).unwrap_err();
            assert_eq!(e.code, 2, "{bad}");
            assert!(e.error.to_string().contains(bad), "{}", e.error);
        }
    }
}
