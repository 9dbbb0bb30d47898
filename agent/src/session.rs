//! The worker's standing with the coordinator: registering (again, when it forgot us),
//! heartbeats that carry STOP and REREGISTER back, and deregistering when leaving.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1;
use tonic::Code;

use crate::client::status_error;
use crate::error::{Error, Result};
use crate::{Client, Current, Me, nccl, retry, take};

/// What a worker registers: the deprecated text and the enum, so that coordinators from before
/// `device_kind` accept it too.
fn cpu_capabilities() -> v1::Capabilities {
    v1::Capabilities {
        device: jobspec::Device::Cpu.as_str().into(),
        device_kind: v1::DeviceKind::Cpu as i32,
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        ..Default::default()
    }
}

/// Registers and returns the heartbeat interval. An unreachable coordinator is retried with
/// backoff until `deadline` (`None`: for ever); a refusal (wrong token, bad field) is final.
pub(crate) fn register(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    ring_address: SocketAddr,
    current: &Mutex<Current>,
    deadline: Option<Instant>,
) -> Result<Duration> {
    let caps = take(current, |c| nccl::capabilities(c.cuda.as_ref(), cpu_capabilities()));
    let req = v1::RegisterWorkerRequest {
        hostname: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        capabilities: Some(caps),
        ring_address: ring_address.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut backoff = retry::Backoff::default();
    let health = take(current, |c| c.health.clone());
    let r = loop {
        health.beat();
        match rt.block_on(client.clone().register(req.clone())) {
            Ok(r) => break r.into_inner(),
            Err(s) if !retryable(s.code()) => return Err(status_error(s)),
            Err(s) => {
                let Some(wait) = retry::wait_within(&mut backoff, deadline) else {
                    return Err(Error::failure(format!("Register: {}: gave up (--connect-timeout)", s.message())));
                };
                tracing::warn!("Register: {}; retry {} in {wait:.1?}", s.message(), backoff.retries);
                std::thread::sleep(wait);
            }
        }
    };
    tracing::info!(worker = %r.worker_id, ring = %ring_address, "registered");
    take(current, |c| c.me = Me { id: r.worker_id, secret: r.worker_secret });
    health.set_registered(true);
    Ok(Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 60_000)))
}

/// The coordinator forgot this worker: register again at the next poll, and not ready until then.
pub(crate) fn must_reregister(current: &Mutex<Current>) {
    take(current, |c| {
        c.reregister = true;
        c.health.set_registered(false);
    });
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

pub(crate) async fn heartbeats(mut client: Client, current: Arc<Mutex<Current>>, interval: Duration) {
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
            Ok(v1::WorkerCommand::Reregister) => must_reregister(&current),
            // A coordinator on a new state directory no longer knows our secret.
            Err(s) if s.code() == Code::Unauthenticated && s.message().starts_with("worker_secret") => {
                tracing::warn!("heartbeat: {}; registering again", s.message());
                must_reregister(&current);
            }
            Ok(_) => {}
            Err(s) => tracing::warn!("heartbeat: {}", s.message()),
        }
    }
}

/// The reason text of a worker that leaves (the meaning travels as `FailureKind` /
/// Deregister; the text is for logs and the job's reason).
pub(crate) const SHUTDOWN_REASON: &str = "worker shutting down (SIGTERM)";

/// Tells the coordinator this worker is gone, so that it need not wait for the heartbeat
/// timeout. Best effort: the worker leaves anyway.
pub(crate) fn deregister(rt: &tokio::runtime::Runtime, client: &Client, me: &Me) {
    let req = v1::DeregisterRequest {
        worker_id: me.id.clone(),
        reason: SHUTDOWN_REASON.to_owned(),
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
