//! `--health-listen`: plain-HTTP liveness and readiness for an orchestrator's probes.
//!
//! - `GET /healthz`: 200 while the agent's own thread beats (the poll loop, the retry loops
//!   and every training step call [`Health::beat`]), 503 once the last beat is older than the
//!   stale limit. The coordinator heartbeat task deliberately does not beat: it runs on the
//!   runtime and would keep a worker "alive" whose training thread is wedged.
//! - `GET /readyz`: 200 while the worker is registered with the coordinator (and alive), 503
//!   before it registers, while it registers again, and once it has deregistered.
//!
//! The server is a task of its own on the agent's runtime that only reads atomics: the training
//! thread's cost is one relaxed store per step.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

/// A probe's request head is a few hundred bytes; hyper's smallest buffer is plenty.
const MAX_HTTP_HEAD: usize = 8 << 10;
/// A prober gets this long to send its request and read the answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the probes read: when the agent last beat, and whether it is registered.
pub struct Health {
    born: Instant,
    /// Milliseconds from `born` to the last beat.
    beat_ms: AtomicU64,
    registered: AtomicBool,
    stale_after: Duration,
}

impl Health {
    /// Alive (a beat now), not registered; `/healthz` turns 503 after `stale_after` without beats.
    pub fn new(stale_after: Duration) -> Health {
        Health { born: Instant::now(), beat_ms: AtomicU64::new(0), registered: AtomicBool::new(false), stale_after }
    }

    /// The stale limit for a worker whose collectives may wait `collective_timeout`: nothing the
    /// agent does between beats (forming the ring, NCCL setup, an evaluation or checkpoint that
    /// the other ranks wait for) can take longer without the gang failing anyway; twice that,
    /// and at least a minute, so that a slow step is not taken for a hang.
    pub fn stale_limit(collective_timeout: Duration) -> Duration {
        (collective_timeout * 2).max(Duration::from_secs(60))
    }

    /// The agent's thread is alive now.
    pub fn beat(&self) {
        self.beat_ms.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    /// Time since the last beat, as of `now`.
    fn silence(&self, now: Instant) -> Duration {
        let last = self.born + Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Whether the agent beat within the stale limit of `now`.
    pub fn alive_at(&self, now: Instant) -> bool {
        self.silence(now) <= self.stale_after
    }

    pub fn ready_at(&self, now: Instant) -> bool {
        self.registered.load(Ordering::Relaxed) && self.alive_at(now)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Health::stale_limit(Duration::from_secs(60)))
    }
}

/// Serves `/healthz` and `/readyz` (HTTP/1.x, one request per connection) on `listener` until
/// `stop` turns true. Must run inside a tokio runtime.
pub async fn serve(listener: std::net::TcpListener, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let listener = match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("health endpoint: {e}");
            return;
        }
    };
    let addr = listener.local_addr().map_or_else(|_| "?".into(), |a: SocketAddr| a.to_string());
    tracing::info!("health endpoint on http://{addr}/healthz and /readyz");
    let app = Router::new()
        .route("/healthz", any(healthz))
        .route("/readyz", any(readyz))
        .fallback(elsewhere)
        .with_state(health);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false).max_buf_size(MAX_HTTP_HEAD);
    loop {
        let conn = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                tracing::warn!("health endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let serve = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            if let Ok(Err(e)) = tokio::time::timeout(HTTP_TIMEOUT, serve).await {
                tracing::debug!("health endpoint: {e}");
            }
        });
    }
}

async fn healthz(State(h): State<Arc<Health>>, method: Method) -> Response {
    if method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n".into());
    }
    let now = Instant::now();
    if h.alive_at(now) {
        plain(StatusCode::OK, "ok\n".into())
    } else {
        let s = h.silence(now).as_secs();
        plain(StatusCode::SERVICE_UNAVAILABLE, format!("stale: the agent last beat {s} s ago\n"))
    }
}

async fn readyz(State(h): State<Arc<Health>>, method: Method) -> Response {
    if method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n".into());
    }
    let now = Instant::now();
    match (h.registered.load(Ordering::Relaxed), h.alive_at(now)) {
        (true, true) => plain(StatusCode::OK, "ready\n".into()),
        (false, _) => plain(StatusCode::SERVICE_UNAVAILABLE, "not registered with the coordinator\n".into()),
        (true, false) => plain(StatusCode::SERVICE_UNAVAILABLE, "stale\n".into()),
    }
}

async fn elsewhere() -> Response {
    plain(StatusCode::NOT_FOUND, "only /healthz and /readyz are served\n".into())
}

fn plain(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_until_the_stale_limit_passes_without_a_beat() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = h.born;
        assert!(h.alive_at(t0 + Duration::from_secs(5)));
        assert!(!h.alive_at(t0 + Duration::from_secs(6)));
        h.beat_ms.store(4_000, Ordering::Relaxed);
        assert!(h.alive_at(t0 + Duration::from_secs(9)));
        assert!(!h.alive_at(t0 + Duration::from_millis(9_001)));
    }

    #[test]
    fn ready_only_while_registered_and_alive() {
        let h = Health::new(Duration::from_secs(5));
        let t0 = h.born;
        assert!(!h.ready_at(t0));
        h.set_registered(true);
        assert!(h.ready_at(t0));
        assert!(!h.ready_at(t0 + Duration::from_secs(6)));
        h.set_registered(false);
        assert!(!h.ready_at(t0));
    }

    #[test]
    fn the_stale_limit_follows_the_collective_timeout_with_a_floor() {
        assert_eq!(Health::stale_limit(Duration::from_secs(120)), Duration::from_secs(240));
        assert_eq!(Health::stale_limit(Duration::from_secs(5)), Duration::from_secs(60));
    }
}
