//! The bert2bert coordinator: takes jobs over gRPC (`bert2bert.v1.JobService`), keeps them in
//! an embedded SQLite database in its state directory, and tracks workers
//! (`bert2bert.v1.WorkerService`) by their heartbeats.
//!
//! Layers, top down: [`service`] (thin gRPC handlers) -> [`convert`] (protobuf <-> domain) ->
//! [`jobs`] / [`workers`] (domain state) -> [`store`] (persistence, a trait with an SQLite
//! implementation and an in-memory fake). [`serve`] puts it together with bearer-token
//! authentication ([`auth`]), request size limits, `grpc.health.v1` and server reflection,
//! optional TLS ([`tls`]) and an optional Prometheus endpoint ([`metrics`]).

pub mod admission;
pub mod auth;
pub mod convert;
pub mod domain;
pub mod error;
pub mod goodput;
pub mod jobs;
pub mod metrics;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod tls;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::v1::job_service_server::JobServiceServer;
use proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::auth::BearerAuth;
use crate::domain::{Clock, SystemClock};
pub use crate::error::{Error, Result};
use crate::jobs::Jobs;
use crate::metrics::{MeteredStore, Metrics, RpcMetricsLayer};
use crate::scheduler::Scheduler;
use crate::service::{JobApi, WorkerApi};
use crate::store::{SqliteStore, Store};
use crate::workers::Workers;

/// The largest request metadata (HTTP/2 header list) accepted.
const MAX_HEADER_BYTES: u32 = 16 << 10;

/// How to run a coordinator.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen; port 0 picks a free port (see [`start`]).
    pub listen: SocketAddr,
    /// Holds `coordinator.sqlite`; a coordinator restarted on the same directory resumes.
    pub state_dir: PathBuf,
    /// JobService callers must send `authorization: Bearer <client_token>`.
    pub client_token: String,
    /// WorkerService callers must send `authorization: Bearer <worker_token>`.
    pub worker_token: String,
    pub heartbeat_interval: Duration,
    /// A worker silent for longer is marked dead.
    pub heartbeat_timeout: Duration,
    /// The largest request message accepted (RESOURCE_EXHAUSTED beyond it).
    pub max_request_bytes: usize,
    /// Serve gRPC over TLS (clients then use `https://`).
    pub tls: Option<tls::Tls>,
    /// Where to serve plain-HTTP `GET /metrics` (Prometheus text format); port 0 picks a port.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a PENDING job waits for `workers` before starting with at least `min_workers`.
    pub elastic_wait: Duration,
    /// Where jobs may point (allowed roots); a job outside them is INVALID_ARGUMENT at submit.
    pub path_policy: jobspec::policy::PathPolicy,
}

impl Config {
    /// Defaults: 2 s heartbeats, 10 s timeout, 1 MiB requests; one token for clients and workers.
    pub fn new(listen: SocketAddr, state_dir: impl Into<PathBuf>, token: impl Into<String>) -> Config {
        let token = token.into();
        Config {
            listen,
            state_dir: state_dir.into(),
            client_token: token.clone(),
            worker_token: token,
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            max_request_bytes: 1 << 20,
            tls: None,
            metrics_listen: None,
            elastic_wait: scheduler::DEFAULT_ELASTIC_WAIT,
            path_policy: jobspec::policy::PathPolicy::default(),
        }
    }

    fn check(&self) -> Result<()> {
        for (what, t) in [("client token", &self.client_token), ("worker token", &self.worker_token)] {
            if t.trim().is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::InvalidArgument(format!("the {what} must be non-empty, without whitespace")));
            }
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(Error::InvalidArgument("the heartbeat timeout must exceed the heartbeat interval".into()));
        }
        if let Some(tls) = &self.tls {
            tls.check()?;
        }
        Ok(())
    }
}

/// Binds `config.listen` and serves until `shutdown` completes; open Watch streams then end
/// with UNAVAILABLE and in-flight calls finish.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    config.check()?;
    let listener = bind(config.listen).await?;
    serve_on(listener, config, shutdown).await
}

async fn bind_metrics(config: &Config) -> Result<Option<TcpListener>> {
    match config.metrics_listen {
        Some(addr) => Ok(Some(metrics::bind(addr).await?)),
        None => Ok(None),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::io(format!("cannot listen on {addr}"), e))
}

/// Serves on a bound listener (whose address the caller already knows).
pub async fn serve_on(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.check()?;
    let state = State::open(&config)?;
    let metrics_listener = bind_metrics(&config).await?;
    run(Listeners { grpc: listener, metrics: metrics_listener }, config, state, shutdown).await
}

/// The bound sockets a coordinator serves on.
struct Listeners {
    grpc: TcpListener,
    metrics: Option<TcpListener>,
}

/// The state directory, opened and locked: one coordinator per directory at a time. The lock
/// is an OS file lock, so a killed coordinator leaves none behind.
struct State {
    _lock: std::fs::File,
    store: Arc<dyn Store>,
    /// The key that per-worker secrets derive from, kept in the state directory.
    secrets: auth::WorkerSecrets,
}

impl State {
    fn open(config: &Config) -> Result<State> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let path = dir.join("coordinator.lock");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::FailedPrecondition(format!(
                    "{}: another coordinator is using this state directory",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path.display().to_string(), e)),
        }
        let secrets = auth::WorkerSecrets::load_or_create(dir)?;
        Ok(State { _lock: lock, store: Arc::new(SqliteStore::open(dir)?), secrets })
    }
}

async fn run(
    listeners: Listeners,
    config: Config,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let store: Arc<dyn Store> = Arc::new(MeteredStore::new(state.store.clone(), metrics.clone()));
    let jobs = Arc::new(Jobs::new(store.clone(), clock.clone()));
    let workers = Workers::load(store.clone(), clock.clone(), config.heartbeat_interval, config.heartbeat_timeout)?;
    let workers = Arc::new(workers.with_secrets(state.secrets.clone()));
    let scheduler = Arc::new(
        Scheduler::new(jobs.clone(), workers.clone(), store, clock.clone())?.with_elastic_wait(config.elastic_wait),
    );
    let (stop_tx, stop_rx) = watch::channel(false);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobServiceServer<JobApi>>().await;
    health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("server reflection: {e}")))?;

    let mut tasks = Vec::new();
    if let Some(listener) = listeners.metrics {
        let addr = listener.local_addr().map_err(|e| Error::io("metrics listener address", e))?;
        tracing::info!(%addr, "serving GET /metrics");
        let serve = metrics::serve_http(listener, metrics.clone(), jobs.clone(), workers.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(serve));
        tasks.push(tokio::spawn(metrics::follow_progress(metrics.clone(), jobs.clone(), stop_rx.clone())));
    }
    let policy = Arc::new(config.path_policy.clone());
    let job_api = JobApi { jobs, clock, shutdown: stop_rx.clone(), policy, gate: Default::default() };
    let job_service = JobServiceServer::new(job_api).max_decoding_message_size(config.max_request_bytes);
    let worker_service = WorkerServiceServer::new(WorkerApi { workers: workers.clone(), scheduler: scheduler.clone() })
        .max_decoding_message_size(config.max_request_bytes);

    tasks.push(tokio::spawn(reap_dead_workers(workers, scheduler, metrics.clone(), stop_rx)));
    let listener = listeners.grpc;
    let addr = listener.local_addr().map_err(|e| Error::io("listener address", e))?;
    tracing::info!(%addr, state = %config.state_dir.display(), tls = config.tls.is_some(), "coordinator serving");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        server = server.tls_config(tls.server_config())?;
    }
    let result = server
        .layer(RpcMetricsLayer::new(metrics))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Metadata (the bearer token included) is small; bound it as well as the messages.
        .http2_max_header_list_size(MAX_HEADER_BYTES)
        .concurrency_limit_per_connection(256)
        .add_service(health)
        .add_service(reflection)
        .add_service(InterceptedService::new(job_service, BearerAuth::new(&config.client_token, "client")))
        .add_service(InterceptedService::new(worker_service, BearerAuth::new(&config.worker_token, "worker")))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            tracing::info!("coordinator shutting down");
            let _ = stop_tx.send(true);
        })
        .await;
    for task in tasks {
        let _ = task.await;
    }
    drop(state);
    result.map_err(Error::from)
}

async fn reap_dead_workers(
    workers: Arc<Workers>,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval((workers.heartbeat_timeout / 4).max(Duration::from_millis(50)));
    loop {
        tokio::select! {
            _ = service::stopped(&mut stop) => return,
            _ = tick.tick() => {
                match workers.reap() {
                    Ok(dead) if !dead.is_empty() => {
                        metrics.heartbeat_timeouts(dead.len());
                        if let Err(e) = scheduler.lost(&dead) {
                            tracing::error!("ending the attempts of lost workers: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!("reaping dead workers: {e}"),
                }
            }
        }
    }
}

/// A coordinator running on the current tokio runtime; see [`start`].
pub struct Running {
    /// The address it listens on (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Locks and opens the state directory, binds (port 0 picks a port), then serves in a task
/// until [`Running::shutdown`] or until the [`Running`] is dropped.
pub async fn start(config: Config) -> Result<Running> {
    config.check()?;
    let state = State::open(&config)?;
    let listener = bind(config.listen).await?;
    let addr = listener.local_addr().map_err(|e| Error::io("listener address", e))?;
    let metrics = bind_metrics(&config).await?;
    let metrics_addr = match &metrics {
        Some(l) => Some(l.local_addr().map_err(|e| Error::io("metrics listener address", e))?),
        None => None,
    };
    let tls = config.tls.is_some();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(Listeners { grpc: listener, metrics }, config, state, async move {
        let _ = stopped.await;
    }));
    Ok(Running { addr, metrics_addr, tls, stop: Some(stop), task })
}

impl Running {
    /// `http://ADDR` (`https://` with TLS), for clients.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Serves until `signal` completes (then shuts down) or the server fails.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<()> {
        let finished = tokio::select! {
            () = signal => None,
            r = &mut self.task => Some(r),
        };
        match finished {
            None => self.shutdown().await,
            Some(r) => r.map_err(|e| Error::Internal(format!("coordinator task: {e}")))?,
        }
    }

    /// Stops serving and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(|e| Error::Internal(format!("coordinator task: {e}")))?
    }
}
