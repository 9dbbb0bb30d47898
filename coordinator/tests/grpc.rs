//! The coordinator over real gRPC on 127.0.0.1:0, in-process. Every test shuts it down.

use std::path::Path;
use std::time::Duration;

use coordinator::{Config, Running};
use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const CLIENT_TOKEN: &str = "client-secret";
const WORKER_TOKEN: &str = "worker-secret";

const JOB: &str = "name: tiny\nmodel: { init: /models/m }\ndata: { train: /data/train.jsonl }\n\
    training: { steps: 10, global_batch: 4 }\nresources: { workers: 2, device: cpu }\n";

/// Sends `authorization: Bearer <token>` when it has one.
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;
type Workers = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

async fn start(state: &Path) -> Running {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), state, CLIENT_TOKEN);
    config.worker_token = WORKER_TOKEN.into();
    config.max_request_bytes = 64 << 10;
    coordinator::start(config).await.expect("coordinator starts")
}

async fn channel(c: &Running) -> Channel {
    Channel::from_shared(c.url()).unwrap().connect().await.expect("connect")
}

async fn jobs(c: &Running, token: Option<&str>) -> Jobs {
    JobServiceClient::with_interceptor(channel(c).await, Bearer(token.map(str::to_owned)))
}

async fn workers(c: &Running, token: Option<&str>) -> Workers {
    WorkerServiceClient::with_interceptor(channel(c).await, Bearer(token.map(str::to_owned)))
}

async fn submit(j: &mut Jobs, yaml: &str) -> Result<v1::Job, Status> {
    Ok(j.submit(v1::SubmitJobRequest { job_yaml: yaml.into() }).await?.into_inner().job.unwrap())
}

async fn list(j: &mut Jobs) -> Vec<v1::Job> {
    j.list(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs
}

#[tokio::test]
async fn submitted_job_is_pending_listed_and_gettable() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let job = submit(&mut j, JOB).await.unwrap();
    assert_eq!(job.state(), v1::JobState::Pending);
    assert_eq!((job.name.as_str(), job.total_steps, job.workers, job.step), ("tiny", 10, 2, 0));
    assert!(job.spec_yaml.contains("global_batch: 4"), "{}", job.spec_yaml);
    let listed = list(&mut j).await;
    assert_eq!(listed.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()]);
    let got = j.get(v1::GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(got, job);
    let missing = j.get(v1::GetJobRequest { job_id: "job-404".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad_filter = j.list(v1::ListJobsRequest { states: vec![77], ..Default::default() }).await.unwrap_err();
    assert_eq!(bad_filter.code(), Code::InvalidArgument);
    assert!(bad_filter.message().starts_with("states[0]: "), "{}", bad_filter.message());
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_job_yaml_is_invalid_argument_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let zero_steps = JOB.replace("steps: 10", "steps: 0");
    let e = submit(&mut j, &zero_steps).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("job_yaml: training.steps: "), "{}", e.message());
    let unknown = format!("{JOB}colour: blue\n");
    let e = submit(&mut j, &unknown).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("job_yaml: ") && e.message().contains("colour"), "{}", e.message());
    let e = submit(&mut j, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Too large a request is refused before it is decoded.
    let huge = format!("{JOB}# {}\n", "x".repeat(100 << 10));
    let e = submit(&mut j, &huge).await.unwrap_err();
    assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "{e:?}");
    assert!(list(&mut j).await.is_empty(), "nothing stored");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn missing_or_wrong_token_is_unauthenticated_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    for token in [None, Some("wrong"), Some(WORKER_TOKEN)] {
        let mut j = jobs(&c, token).await;
        let e = submit(&mut j, JOB).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
        let e = j.list(v1::ListJobsRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    for token in [None, Some(CLIENT_TOKEN)] {
        let mut w = workers(&c, token).await;
        let e = w.heartbeat(v1::HeartbeatRequest { worker_id: "w-1".into(), ..Default::default() }).await;
        assert_eq!(e.unwrap_err().code(), Code::Unauthenticated, "{token:?}");
    }
    // Oversized metadata is refused too.
    let mut j = jobs(&c, Some(&"x".repeat(64 << 10))).await;
    let e = j.list(v1::ListJobsRequest::default()).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert!(list(&mut jobs(&c, Some(CLIENT_TOKEN)).await).await.is_empty());
    c.shutdown().await.unwrap();
}

async fn next_job(stream: &mut tonic::Streaming<v1::WatchJobResponse>) -> Option<v1::Job> {
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("watch stalled");
    match msg.unwrap()?.event {
        Some(v1::watch_job_response::Event::Job(j)) => Some(j),
        other => panic!("expected a job event, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_ends_the_job_and_its_watch() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let job = submit(&mut j, JOB).await.unwrap();
    let mut watch = j.watch(v1::WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(next_job(&mut watch).await.unwrap().state(), v1::JobState::Pending);
    let req = v1::CancelJobRequest { job_id: job.id.clone(), reason: String::new() };
    let cancelled = j.cancel(req.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!(cancelled.state(), v1::JobState::Cancelled);
    assert_eq!(cancelled.reason, "cancelled by user");
    let last = next_job(&mut watch).await.unwrap();
    assert_eq!(last.state(), v1::JobState::Cancelled);
    assert!(next_job(&mut watch).await.is_none(), "the watch ends after the terminal state");
    assert_eq!(j.cancel(req).await.unwrap_err().code(), Code::FailedPrecondition);
    // Watching a finished job gives its state and ends.
    let mut again = j.watch(v1::WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(next_job(&mut again).await.unwrap().state(), v1::JobState::Cancelled);
    assert!(next_job(&mut again).await.is_none());
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn restarted_coordinator_still_has_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let a = submit(&mut j, JOB).await.unwrap();
    let b = submit(&mut j, JOB).await.unwrap();
    j.cancel(v1::CancelJobRequest { job_id: b.id.clone(), reason: "no longer needed".into() }).await.unwrap();
    // An open Watch must not keep the server from shutting down.
    let mut watch = j.watch(v1::WatchJobRequest { job_id: a.id.clone() }).await.unwrap().into_inner();
    next_job(&mut watch).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), c.shutdown()).await.expect("shutdown hangs").unwrap();
    drop((j, watch));

    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let listed = list(&mut j).await;
    assert_eq!(listed.len(), 2);
    let got_a = j.get(v1::GetJobRequest { job_id: a.id.clone() }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(got_a, a);
    let got_b = listed.iter().find(|x| x.id == b.id).unwrap();
    assert_eq!((got_b.state(), got_b.reason.as_str()), (v1::JobState::Cancelled, "no longer needed"));
    let new = submit(&mut j, JOB).await.unwrap();
    assert!(new.id != a.id && new.id != b.id, "ids are not reused: {}", new.id);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut h = HealthClient::new(channel(&c).await);
    for service in ["", "bert2bert.v1.JobService", "bert2bert.v1.WorkerService"] {
        let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut r = ServerReflectionClient::new(channel(&c).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["bert2bert.v1.JobService", "bert2bert.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{names:?}");
    }
    drop(stream);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn workers_register_and_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut w = workers(&c, Some(WORKER_TOKEN)).await;
    let caps = v1::Capabilities { device: "cpu".into(), cpu_threads: 2, ..Default::default() };
    let reg = v1::RegisterWorkerRequest {
        hostname: "box".into(),
        capabilities: Some(caps.clone()),
        ring_address: "127.0.0.1:7000".into(),
        version: "0.1.0".into(),
    };
    let r = w.register(reg.clone()).await.unwrap().into_inner();
    assert!(!r.worker_id.is_empty() && r.heartbeat_timeout_ms > r.heartbeat_interval_ms);
    assert_eq!(r.worker_secret.len(), 64);
    let hb = |id: &str, secret: &str| v1::HeartbeatRequest {
        worker_id: id.into(),
        worker_secret: secret.into(),
        ..Default::default()
    };
    let cmd = w.heartbeat(hb(&r.worker_id, &r.worker_secret)).await.unwrap().into_inner().command();
    assert_eq!(cmd, v1::WorkerCommand::Continue);
    // The shared worker token is not enough to speak for a worker: its secret is needed too.
    for secret in ["", r.worker_secret.as_str()] {
        let e = w.heartbeat(hb(if secret.is_empty() { &r.worker_id } else { "w-other" }, secret)).await;
        assert_eq!(e.unwrap_err().code(), Code::Unauthenticated);
    }
    let bad = v1::RegisterWorkerRequest { ring_address: "nowhere".into(), ..reg };
    let e = w.register(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("ring_address: "), "{}", e.message());
    let e = w.get_assignment(v1::GetAssignmentRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("worker_id: "), "{}", e.message());
    // No job: nothing to do yet.
    let req = v1::GetAssignmentRequest {
        worker_id: r.worker_id.clone(),
        wait_ms: 0,
        worker_secret: r.worker_secret.clone(),
        ..Default::default()
    };
    assert!(w.get_assignment(req).await.unwrap().into_inner().assignment.is_none());
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_worker_is_declared_dead_and_told_to_reregister() {
    use coordinator::domain::WorkerState;
    use coordinator::store::{SqliteStore, Store};

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), CLIENT_TOKEN);
    config.worker_token = WORKER_TOKEN.into();
    config.heartbeat_interval = Duration::from_millis(50);
    config.heartbeat_timeout = Duration::from_millis(300);
    let c = coordinator::start(config).await.unwrap();
    let mut w = workers(&c, Some(WORKER_TOKEN)).await;
    let caps = v1::Capabilities { device: "cpu".into(), ..Default::default() };
    let reg = v1::RegisterWorkerRequest { capabilities: Some(caps), ..Default::default() };
    let r = w.register(reg).await.unwrap().into_inner();
    let id = r.worker_id;

    // Watch the database (not the worker API: a heartbeat would keep the worker alive).
    let db = SqliteStore::open(dir.path()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = db.workers().unwrap().into_iter().find(|x| x.id == id).map(|x| x.state);
        if state == Some(WorkerState::Dead) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "worker never declared dead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hb = v1::HeartbeatRequest { worker_id: id, worker_secret: r.worker_secret, ..Default::default() };
    assert_eq!(w.heartbeat(hb).await.unwrap().into_inner().command(), v1::WorkerCommand::Reregister);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_coordinator_per_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), CLIENT_TOKEN);
    let Err(e) = coordinator::start(config.clone()).await else { panic!("a second coordinator started") };
    assert!(e.to_string().contains("another coordinator"), "{e}");
    c.shutdown().await.unwrap();
    // The lock goes with the first coordinator.
    coordinator::start(config).await.unwrap().shutdown().await.unwrap();
}

#[tokio::test]
async fn nccl_unique_id_is_relayed_from_rank_0_and_checked() {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;

    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let mut w = workers(&c, Some(WORKER_TOKEN)).await;
    submit(&mut j, &JOB.replace("device: cpu", "device: cuda")).await.unwrap();
    let mut ids = Vec::new();
    let mut secrets = std::collections::HashMap::new();
    for port in [7001, 7002] {
        let caps = v1::Capabilities { device: "cuda".into(), ..Default::default() };
        let reg = v1::RegisterWorkerRequest {
            capabilities: Some(caps),
            ring_address: format!("127.0.0.1:{port}"),
            ..Default::default()
        };
        let r = w.register(reg).await.unwrap().into_inner();
        ids.push(r.worker_id.clone());
        secrets.insert(r.worker_id, r.worker_secret);
    }
    let poll = |id: &str, wait_ms: u32, nccl: Vec<u8>| v1::GetAssignmentRequest {
        worker_id: id.into(),
        wait_ms,
        nccl_unique_id: nccl,
        worker_secret: secrets[id].clone(),
        held_state: None,
    };
    let assignment = |r: tonic::Response<v1::GetAssignmentResponse>| r.into_inner().assignment.expect("an assignment");
    let first = assignment(w.get_assignment(poll(&ids[0], 2_000, vec![])).await.unwrap());
    let (rank0, rank1) = if first.rank == 0 { (&ids[0], &ids[1]) } else { (&ids[1], &ids[0]) };
    // Rank 1 is held up to wait_ms for the id, then gets its assignment without it.
    let t0 = tokio::time::Instant::now();
    let early = assignment(w.get_assignment(poll(rank1, 300, vec![])).await.unwrap());
    assert!(t0.elapsed() >= Duration::from_millis(250), "{:?}", t0.elapsed());
    assert_eq!((early.rank, early.nccl_unique_id.len()), (1, 0));

    let e = w.get_assignment(poll(rank0, 0, vec![7; 5])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("nccl_unique_id: must be 128 bytes, got 5"), "{}", e.message());
    let random = RandomState::new();
    let id: Vec<u8> = (0..128u32).map(|i| random.hash_one(i) as u8).collect();
    let e = w.get_assignment(poll(rank1, 0, id.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A rank 1 already waiting gets the id as soon as rank 0 posts it.
    let mut w1 = w.clone();
    let waiting = tokio::spawn({
        let req = poll(rank1, 5_000, vec![]);
        async move { (w1.get_assignment(req).await, tokio::time::Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let posted_at = tokio::time::Instant::now();
    let own = assignment(w.get_assignment(poll(rank0, 0, id.clone())).await.unwrap());
    assert_eq!(own.nccl_unique_id, id);
    let (got, at) = waiting.await.unwrap();
    let got = assignment(got.unwrap());
    assert_eq!((got.rank, got.attempt, &got.nccl_unique_id), (1, own.attempt, &id));
    assert!(at - posted_at < Duration::from_secs(2), "the waiting rank was not woken by the post");
    c.shutdown().await.unwrap();
}

/// A worker that deregisters is gone at once (no heartbeat timeout): an attempt it was in
/// ends and the job waits again; its heartbeats are told to re-register.
#[tokio::test]
async fn a_deregistered_worker_leaves_its_gang_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let job = submit(&mut j, JOB).await.unwrap();
    let mut w = workers(&c, Some(WORKER_TOKEN)).await;
    let (mut ids, mut secrets) = (Vec::new(), Vec::new());
    for port in [7001, 7002] {
        let reg = v1::RegisterWorkerRequest {
            capabilities: Some(v1::Capabilities { device: "cpu".into(), ..Default::default() }),
            ring_address: format!("127.0.0.1:{port}"),
            ..Default::default()
        };
        let r = w.register(reg).await.unwrap().into_inner();
        let (id, worker_secret) = (r.worker_id, r.worker_secret);
        let ask = v1::GetAssignmentRequest {
            worker_id: id.clone(),
            wait_ms: 0,
            worker_secret: worker_secret.clone(),
            ..Default::default()
        };
        w.get_assignment(ask).await.unwrap();
        ids.push(id);
        secrets.push(worker_secret);
    }
    let ask = v1::GetAssignmentRequest {
        worker_id: ids[0].clone(),
        wait_ms: 0,
        worker_secret: secrets[0].clone(),
        ..Default::default()
    };
    assert!(w.get_assignment(ask).await.unwrap().into_inner().assignment.is_some(), "a gang of two");
    let get = v1::GetJobRequest { job_id: job.id.clone() };
    assert_eq!(j.get(get.clone()).await.unwrap().into_inner().job.unwrap().state(), v1::JobState::Running);

    let e = w.deregister(v1::DeregisterRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("worker_id: "), "{}", e.message());
    let bye = v1::DeregisterRequest {
        worker_id: ids[1].clone(),
        reason: "maintenance".into(),
        worker_secret: secrets[1].clone(),
    };
    w.deregister(bye.clone()).await.unwrap();
    let now = j.get(get).await.unwrap().into_inner().job.unwrap();
    assert_eq!(now.state(), v1::JobState::Pending, "{now:?}");
    assert!(now.reason.contains("left (maintenance)"), "{}", now.reason);
    let hb =
        v1::HeartbeatRequest { worker_id: ids[1].clone(), worker_secret: secrets[1].clone(), ..Default::default() };
    assert_eq!(w.heartbeat(hb).await.unwrap().into_inner().command(), v1::WorkerCommand::Reregister);
    w.deregister(bye).await.expect("deregistering twice is harmless");
    c.shutdown().await.unwrap();
}

/// Worker ids are visible in Watch, and the worker token is shared: neither is enough to
/// report for a worker. A forged ReportDone or CommitCheckpoint without that worker's secret
/// (or with another worker's) is UNAUTHENTICATED and changes nothing; a member's commit of a
/// path outside the job's checkpoint.dir is INVALID_ARGUMENT.
#[tokio::test]
async fn forged_worker_reports_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = jobs(&c, Some(CLIENT_TOKEN)).await;
    let job = submit(&mut j, &format!("{JOB}checkpoint: {{ dir: /ckpt/tiny }}\n")).await.unwrap();
    let mut w = workers(&c, Some(WORKER_TOKEN)).await;
    let mut gang = Vec::new();
    for port in [7001, 7002, 7003] {
        let reg = v1::RegisterWorkerRequest {
            capabilities: Some(v1::Capabilities { device: "cpu".into(), ..Default::default() }),
            ring_address: format!("127.0.0.1:{port}"),
            ..Default::default()
        };
        let r = w.register(reg).await.unwrap().into_inner();
        gang.push((r.worker_id, r.worker_secret));
    }
    let mut rank0 = None;
    for (id, secret) in &gang[..2] {
        let ask = v1::GetAssignmentRequest {
            worker_id: id.clone(),
            wait_ms: 2_000,
            worker_secret: secret.clone(),
            ..Default::default()
        };
        let a = w.get_assignment(ask).await.unwrap().into_inner().assignment.expect("a gang of two");
        if a.rank == 0 {
            rank0 = Some((id.clone(), secret.clone(), a.attempt));
        }
    }
    let (id0, secret0, attempt) = rank0.unwrap();
    let get = v1::GetJobRequest { job_id: job.id.clone() };
    let before = j.get(get.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!(before.state(), v1::JobState::Running);

    let outsider_secret = gang[2].1.clone();
    for secret in [String::new(), outsider_secret.clone(), "0".repeat(64)] {
        let done = v1::ReportDoneRequest {
            worker_id: id0.clone(),
            job_id: job.id.clone(),
            attempt,
            step: 10,
            worker_secret: secret.clone(),
            ..Default::default()
        };
        assert_eq!(w.report_done(done).await.unwrap_err().code(), Code::Unauthenticated);
        let commit = v1::CommitCheckpointRequest {
            worker_id: id0.clone(),
            job_id: job.id.clone(),
            attempt,
            step: 9,
            path: "/etc".into(),
            worker_secret: secret,
            ..Default::default()
        };
        assert_eq!(w.commit_checkpoint(commit).await.unwrap_err().code(), Code::Unauthenticated);
    }
    // The third worker, with its own secret, is not a member of the attempt.
    let done = v1::ReportDoneRequest {
        worker_id: gang[2].0.clone(),
        job_id: job.id.clone(),
        attempt,
        step: 10,
        worker_secret: outsider_secret,
        ..Default::default()
    };
    assert_eq!(w.report_done(done).await.unwrap_err().code(), Code::PermissionDenied);
    // Rank 0 itself may only commit its job's own step directory.
    let commit = |path: &str| v1::CommitCheckpointRequest {
        worker_id: id0.clone(),
        job_id: job.id.clone(),
        attempt,
        step: 9,
        path: path.into(),
        worker_secret: secret0.clone(),
        ..Default::default()
    };
    for bad in ["/etc", "/ckpt/tiny/../../etc/step-00000009", "/ckpt/other/step-00000009"] {
        let e = w.commit_checkpoint(commit(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().starts_with("path: "), "{}", e.message());
    }
    let after = j.get(get.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!((after.state(), after.step, after.checkpoint_step), (v1::JobState::Running, 0, 0), "{after:?}");
    w.commit_checkpoint(commit("/ckpt/tiny/step-00000009")).await.unwrap();
    assert_eq!(j.get(get).await.unwrap().into_inner().job.unwrap().checkpoint_step, 9);
    c.shutdown().await.unwrap();
}
