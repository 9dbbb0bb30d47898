//! The agent against a fake coordinator in the same process: a `WorkerService` that records
//! every call and hands out tiny CPU assignments from a queue. The agent runs on a thread of
//! its own; the test polls what the fake recorded (never a fixed sleep) and ends the agent
//! through its shutdown flag.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1;
use proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use tonic::{Request, Response, Status};

const SECRET: &str = "secret-of-w-1";

/// Everything the agent told the fake, in order.
#[derive(Default)]
struct Recorded {
    registered: Vec<v1::RegisterWorkerRequest>,
    heartbeats: usize,
    progress: Vec<v1::ReportProgressRequest>,
    commits: Vec<v1::CommitCheckpointRequest>,
    done: Vec<v1::ReportDoneRequest>,
    failed: Vec<v1::ReportFailedRequest>,
    deregistered: Vec<v1::DeregisterRequest>,
    /// Calls whose worker id or secret was not the one Register gave.
    bad_credentials: usize,
}

#[derive(Default)]
struct Fake {
    recorded: Mutex<Recorded>,
    /// Assignments handed out one per GetAssignment, in order; `ring_peers` is filled in with
    /// the ring address the worker registered.
    queue: Mutex<VecDeque<v1::Assignment>>,
    ring_address: Mutex<String>,
    /// Attempts the fake answers STOP for (in heartbeats and progress responses).
    stop: Mutex<HashSet<u32>>,
    /// While set, Register does not answer (the worker is not registered yet).
    hold_register: std::sync::atomic::AtomicBool,
}

impl Fake {
    fn check(&self, worker_id: &str, secret: &str) {
        if worker_id != "w-1" || secret != SECRET {
            self.recorded.lock().unwrap().bad_credentials += 1;
        }
    }

    fn command(&self, attempt: u32) -> i32 {
        let stop = self.stop.lock().unwrap().contains(&attempt);
        (if stop { v1::WorkerCommand::Stop } else { v1::WorkerCommand::Continue }) as i32
    }
}

/// Shares the fake between the server and the test.
struct Served(Arc<Fake>);

#[tonic::async_trait]
impl WorkerService for Served {
    async fn register(
        &self,
        req: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let req = req.into_inner();
        while self.0.hold_register.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *self.0.ring_address.lock().unwrap() = req.ring_address.clone();
        self.0.recorded.lock().unwrap().registered.push(req);
        Ok(Response::new(v1::RegisterWorkerResponse {
            worker_id: "w-1".into(),
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 1_000,
            worker_secret: SECRET.into(),
        }))
    }

    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        self.0.recorded.lock().unwrap().heartbeats += 1;
        let command =
            if req.job_id.is_empty() { v1::WorkerCommand::Continue as i32 } else { self.0.command(req.attempt) };
        Ok(Response::new(v1::HeartbeatResponse { command }))
    }

    async fn get_assignment(
        &self,
        req: Request<v1::GetAssignmentRequest>,
    ) -> Result<Response<v1::GetAssignmentResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        let next = self.0.queue.lock().unwrap().pop_front();
        let Some(mut asg) = next else {
            // A short long-poll keeps the agent's loop turning quickly in tests.
            tokio::time::sleep(Duration::from_millis(u64::from(req.wait_ms).min(50))).await;
            return Ok(Response::new(v1::GetAssignmentResponse { assignment: None, ..Default::default() }));
        };
        asg.ring_peers = vec![self.0.ring_address.lock().unwrap().clone()];
        Ok(Response::new(v1::GetAssignmentResponse { assignment: Some(asg), ..Default::default() }))
    }

    async fn report_progress(
        &self,
        req: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        let command = self.0.command(req.attempt);
        self.0.recorded.lock().unwrap().progress.push(req);
        Ok(Response::new(v1::ReportProgressResponse { command }))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<v1::CommitCheckpointRequest>,
    ) -> Result<Response<v1::CommitCheckpointResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        let command = self.0.command(req.attempt);
        self.0.recorded.lock().unwrap().commits.push(req);
        Ok(Response::new(v1::CommitCheckpointResponse { command }))
    }

    async fn report_done(
        &self,
        req: Request<v1::ReportDoneRequest>,
    ) -> Result<Response<v1::ReportDoneResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        self.0.recorded.lock().unwrap().done.push(req);
        Ok(Response::new(v1::ReportDoneResponse {}))
    }

    async fn report_failed(
        &self,
        req: Request<v1::ReportFailedRequest>,
    ) -> Result<Response<v1::ReportFailedResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        self.0.recorded.lock().unwrap().failed.push(req);
        Ok(Response::new(v1::ReportFailedResponse {}))
    }

    async fn deregister(
        &self,
        req: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let req = req.into_inner();
        self.0.check(&req.worker_id, &req.worker_secret);
        self.0.recorded.lock().unwrap().deregistered.push(req);
        Ok(Response::new(v1::DeregisterResponse {}))
    }
}

/// The fake served on 127.0.0.1:0 on its own runtime; dropping it shuts the server down and
/// waits for it.
struct Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Server {
    fn start(fake: Arc<Fake>) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(Served(fake)))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Server { rt, addr, stop: Some(stop), task: Some(task) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            let served = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
            assert!(matches!(served, Ok(Ok(Ok(())))), "the fake server did not shut down cleanly");
        }
    }
}

/// A tiny BERT and a few pairs under `dir`, and a CPU job over them with `steps` steps.
fn tiny_job(dir: &Path, steps: u64) -> String {
    model::testing::write_bert_dir(&dir.join("bert"), 0x5eed ^ steps, None);
    model::testing::write_pairs(&dir.join("train.jsonl"), 1);
    let d = dir.display();
    format!(
        "name: tiny\n\
         model: {{ encoder: {d}/bert, decoder: {d}/bert }}\n\
         data: {{ train: {d}/train.jsonl, max_source_len: 16, max_target_len: 12 }}\n\
         training: {{ steps: {steps}, global_batch: 2, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 5, \
                      precision: fp32 }}\n\
         checkpoint: {{ dir: {d}/ckpt, every_steps: 2, keep: 1 }}\n\
         resources: {{ workers: 1, device: cpu }}\n"
    )
}

fn assignment(job_yaml: &str, attempt: u32) -> v1::Assignment {
    v1::Assignment {
        job_id: "job-1".into(),
        attempt,
        rank: 0,
        world_size: 1,
        job_yaml: job_yaml.into(),
        ring_token: 7 + u64::from(attempt),
        ..Default::default()
    }
}

/// Waits (polling) until `what` holds of the recording; panics naming it after a minute.
fn wait_for(fake: &Fake, what: &str, done: impl Fn(&Recorded) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(&fake.recorded.lock().unwrap()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the agent on a thread against `server`.
fn start_agent(server: &Server) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<agent::Result>) {
    start_agent_with(server, None)
}

fn start_agent_with(
    server: &Server,
    health: Option<std::net::TcpListener>,
) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<agent::Result>) {
    let mut config = agent::Config::new(format!("http://{}", server.addr));
    config.health_listener = health;
    config.token = Some("worker-token".into());
    config.collective_timeout = Duration::from_secs(20);
    config.connect_timeout = Some(Duration::from_secs(30));
    let shutdown = config.shutdown.clone();
    (shutdown, std::thread::spawn(move || agent::run(config)))
}

#[test]
fn registers_trains_a_tiny_cpu_job_reports_it_done_and_deregisters_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let job = tiny_job(dir.path(), 3);
    fake.queue.lock().unwrap().push_back(assignment(&job, 1));
    let server = Server::start(fake.clone());
    let (shutdown, agent) = start_agent(&server);

    wait_for(&fake, "ReportDone", |r| !r.done.is_empty());
    wait_for(&fake, "a heartbeat", |r| r.heartbeats > 0);
    shutdown.store(true, Ordering::SeqCst);
    let ran = agent.join().unwrap();
    assert!(ran.is_ok(), "{:?}", ran.err());

    let r = fake.recorded.lock().unwrap();
    assert_eq!(r.registered.len(), 1);
    let caps = r.registered[0].capabilities.clone().unwrap();
    assert_eq!((caps.device_kind(), caps.device.as_str()), (v1::DeviceKind::Cpu, "cpu"));
    assert!(r.registered[0].ring_address.parse::<SocketAddr>().is_ok(), "{}", r.registered[0].ring_address);
    assert_eq!(r.bad_credentials, 0);
    // Progress: steps in order, ending at the last one, with finite losses.
    let steps: Vec<u64> = r.progress.iter().map(|p| p.progress.unwrap().step).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&3), "{steps:?}");
    for p in &r.progress {
        let p = p.progress.unwrap();
        assert_eq!(p.total_steps, 3);
        assert!(p.loss.is_finite() && p.loss > 0.0, "{p:?}");
    }
    // A checkpoint at step 2 (every_steps) and at the end, each under checkpoint.dir.
    let commits: Vec<u64> = r.commits.iter().map(|c| c.step).collect();
    assert_eq!(commits, [2, 3]);
    for c in &r.commits {
        assert!(Path::new(&c.path).starts_with(dir.path().join("ckpt")), "{}", c.path);
    }
    // keep: 1 leaves the newest only.
    assert!(Path::new(&r.commits[1].path).is_dir(), "{}", r.commits[1].path);
    assert!(!Path::new(&r.commits[0].path).exists(), "{}", r.commits[0].path);
    assert_eq!(r.done.len(), 1);
    assert_eq!((r.done[0].job_id.as_str(), r.done[0].attempt, r.done[0].step), ("job-1", 1, 3));
    assert!(r.failed.is_empty(), "{:?}", r.failed.first().map(|f| &f.reason));
    assert_eq!(r.deregistered.len(), 1);
    assert_eq!(r.deregistered[0].worker_id, "w-1");
    drop(r);
    drop(server);
}

#[test]
fn a_stop_ends_the_attempt_and_shutdown_ends_the_next_one_and_deregisters() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let (long, steps) = (tiny_job(dir.path(), 1_000_000), 1_000_000);
    fake.queue.lock().unwrap().extend([assignment(&long, 1), assignment(&long, 2)]);
    let server = Server::start(fake.clone());
    let (shutdown, agent) = start_agent(&server);
    let reached = |attempt: u32| {
        move |r: &Recorded| r.progress.iter().any(|p| p.attempt == attempt && p.progress.unwrap().step >= 2)
    };

    // STOP: the attempt ends, is reported failed (not the job's fault, not a shutdown), and the
    // agent goes on to its next assignment.
    wait_for(&fake, "progress of attempt 1", reached(1));
    fake.stop.lock().unwrap().insert(1);
    wait_for(&fake, "ReportFailed of attempt 1", |r| !r.failed.is_empty());
    wait_for(&fake, "progress of attempt 2", reached(2));
    assert!(!agent.is_finished());

    // The shutdown flag: the step finishes, the attempt is reported as a worker shutdown, the
    // worker deregisters and `run` returns Ok.
    shutdown.store(true, Ordering::SeqCst);
    let ran = agent.join().unwrap();
    assert!(ran.is_ok(), "{:?}", ran.err());

    let r = fake.recorded.lock().unwrap();
    assert_eq!(r.bad_credentials, 0);
    assert!(r.done.is_empty());
    assert_eq!(r.failed.len(), 2, "{:?}", r.failed.iter().map(|f| &f.reason).collect::<Vec<_>>());
    let (stopped, left) = (&r.failed[0], &r.failed[1]);
    assert_eq!((stopped.attempt, stopped.kind(), stopped.input_error), (1, v1::FailureKind::Error, false));
    assert!(stopped.step >= 2 && stopped.step < steps, "{}", stopped.step);
    assert_eq!((left.attempt, left.kind(), left.input_error), (2, v1::FailureKind::WorkerShutdown, false));
    assert!(left.step >= 2 && left.step < steps, "{}", left.step);
    assert_eq!(r.deregistered.len(), 1);
    assert_eq!(r.deregistered[0].worker_secret, SECRET);
    drop(r);
    drop(server);
}

/// One `GET path` on a new connection: (status, body), or `None` when nothing listens there.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{answer}"));
    Some((status, answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()))
}

/// Polls `GET path` until it answers `status`; panics naming it after a minute.
fn wait_status(addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = http_get(addr, path);
        match got {
            Some((s, body)) if s == status => return body,
            _ => assert!(Instant::now() < deadline, "{path}: waited for {status}, last got {got:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn health_is_live_at_once_ready_once_registered_and_gone_after_shutdown() {
    let fake = Arc::new(Fake::default());
    fake.hold_register.store(true, Ordering::SeqCst);
    let server = Server::start(fake.clone());
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    let (shutdown, agent) = start_agent_with(&server, Some(probe));

    // Register is held: live, not ready.
    assert_eq!(wait_status(addr, "/healthz", 200), "ok\n");
    let body = wait_status(addr, "/readyz", 503);
    assert!(body.contains("not registered"), "{body}");
    assert!(fake.recorded.lock().unwrap().registered.is_empty());
    assert_eq!(http_get(addr, "/metrics").map(|(s, _)| s), Some(404));

    fake.hold_register.store(false, Ordering::SeqCst);
    assert_eq!(wait_status(addr, "/readyz", 200), "ready\n");
    assert_eq!(fake.recorded.lock().unwrap().registered.len(), 1);

    shutdown.store(true, Ordering::SeqCst);
    let ran = agent.join().unwrap();
    assert!(ran.is_ok(), "{:?}", ran.err());
    assert_eq!(fake.recorded.lock().unwrap().deregistered.len(), 1);
    // The server ended with the agent: nothing listens any more.
    assert_eq!(http_get(addr, "/healthz"), None);
    drop(server);
}

#[test]
fn healthz_turns_503_when_the_agent_stops_beating_and_200_when_it_beats_again() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    let health = Arc::new(agent::Health::new(Duration::from_millis(200)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let served = rt.spawn(agent::health::serve(probe, health.clone(), stopped));

    let body = wait_status(addr, "/healthz", 503);
    assert!(body.starts_with("stale"), "{body}");
    health.beat();
    health.set_registered(true);
    // Polled until seen: a slow machine may let the fresh beat go stale before the first look.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(addr, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "/readyz never 200 after a beat");
        health.beat();
    }
    stop.send(true).unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), served).await }).unwrap().unwrap();
    assert_eq!(http_get(addr, "/healthz"), None);
}
