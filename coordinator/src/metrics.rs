//! Prometheus metrics: what the coordinator counts, how it learns it, and a plain-HTTP
//! `GET /metrics` endpoint (axum over hyper's HTTP/1, on its own port) in the Prometheus text
//! format (version 0.0.4).
//!
//! The counts come from outside the domain code, so that the scheduler and the job manager stay
//! free of instrumentation: [`MeteredStore`] sees attempts, restarts and checkpoints as they are
//! stored; [`RpcMetricsLayer`] sees every gRPC call and its final status; [`follow_progress`]
//! watches running jobs for rank 0's progress; gauges of jobs and workers are read at scrape time.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::domain::{Attempt, Checkpoint, Job, JobEvent, JobFilter, JobState, NewJob, Worker};
use crate::error::Result;
use crate::jobs::Jobs;
use crate::store::Store;
use crate::workers::Workers;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: String,
    method: String,
    code: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the coordinator exports, under the `bert2bert_` prefix.
pub struct Metrics {
    registry: Registry,
    jobs: Family<StateLabels, Gauge>,
    workers_alive: Gauge,
    attempts_started: Counter,
    restarts: Counter,
    checkpoints_committed: Counter,
    heartbeat_losses: Counter,
    job_step: Family<JobLabels, Gauge>,
    job_loss: Family<JobLabels, FloatGauge>,
    job_tokens_per_s: Family<JobLabels, FloatGauge>,
    job_goodput: Family<JobLabels, FloatGauge>,
    job_failures: Family<JobLabels, Gauge>,
    job_steps_lost: Family<JobLabels, Gauge>,
    job_recovering_s: Family<JobLabels, FloatGauge>,
    rpcs: Family<RpcLabels, Counter>,
    /// `/package.Service/Method` of every served method: anything else is counted as `other`,
    /// so that a caller cannot grow the label set without bound.
    methods: HashSet<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bert2bert");
        let m = Metrics {
            jobs: Family::default(),
            workers_alive: Gauge::default(),
            attempts_started: Counter::default(),
            restarts: Counter::default(),
            checkpoints_committed: Counter::default(),
            heartbeat_losses: Counter::default(),
            job_step: Family::default(),
            job_loss: Family::default(),
            job_tokens_per_s: Family::default(),
            job_goodput: Family::default(),
            job_failures: Family::default(),
            job_steps_lost: Family::default(),
            job_recovering_s: Family::default(),
            rpcs: Family::default(),
            methods: served_methods(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs by state", m.jobs.clone());
        registry.register("workers_alive", "Registered workers that heartbeat in time", m.workers_alive.clone());
        registry.register("attempts_started", "Attempts (gangs) started", m.attempts_started.clone());
        registry.register("restarts", "Jobs queued again after a failed or lost attempt", m.restarts.clone());
        registry.register("checkpoints_committed", "Checkpoints committed by rank 0", m.checkpoints_committed.clone());
        registry.register(
            "heartbeat_timeout_losses",
            "Workers declared dead for missing their heartbeats",
            m.heartbeat_losses.clone(),
        );
        registry.register("job_step", "Last step rank 0 reported, per running job", m.job_step.clone());
        registry.register("job_loss", "Last training loss rank 0 reported, per running job", m.job_loss.clone());
        registry.register(
            "job_tokens_per_second",
            "Training throughput of the whole gang, per running job",
            m.job_tokens_per_s.clone(),
        );
        registry.register(
            "job_goodput_ratio",
            "Productive step time over wall time since the job first started, per unfinished job",
            m.job_goodput.clone(),
        );
        registry.register("job_failures", "Attempts ended by a failure, per unfinished job", m.job_failures.clone());
        registry.register(
            "job_steps_lost",
            "Steps done again after failures (reported, then resumed from before), per unfinished job",
            m.job_steps_lost.clone(),
        );
        registry.register(
            "job_recovering_seconds",
            "Time from failures to the next attempt's first step, summed, per unfinished job",
            m.job_recovering_s.clone(),
        );
        registry.register("rpc_requests", "gRPC calls by method and final status code", m.rpcs.clone());
        Metrics { registry, ..m }
    }

    /// Workers the heartbeat reaper declared dead.
    pub fn heartbeat_timeouts(&self, n: usize) {
        self.heartbeat_losses.inc_by(n as u64);
    }

    /// The exposition text, with the job and worker gauges read now.
    pub fn render(&self, jobs: &Jobs, workers: &Workers) -> Result<String> {
        let all = jobs.list(&JobFilter::default())?;
        for state in JobState::ALL {
            let n = all.iter().filter(|j| j.state == state).count();
            self.jobs.get_or_create(&StateLabels { state: state.as_str() }).set(n as i64);
        }
        self.workers_alive.set(workers.alive()?.len() as i64);
        for j in &all {
            self.goodput(&j.id, j.goodput.filter(|_| !j.state.is_terminal()));
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .map_err(|_| crate::Error::Internal("encoding metrics".into()))?;
        Ok(out)
    }

    fn progress(&self, job_id: &str, p: &crate::domain::Progress) {
        let l = JobLabels { job: job_id.to_owned() };
        self.job_step.get_or_create(&l).set(p.step as i64);
        self.job_loss.get_or_create(&l).set(f64::from(p.loss));
        self.job_tokens_per_s.get_or_create(&l).set(p.tokens_per_s);
    }

    /// Sets the job's goodput gauges, or drops them (`None`: ended, or no attempt yet).
    fn goodput(&self, job_id: &str, g: Option<crate::goodput::Goodput>) {
        let l = JobLabels { job: job_id.to_owned() };
        let Some(g) = g else {
            self.job_goodput.remove(&l);
            self.job_failures.remove(&l);
            self.job_steps_lost.remove(&l);
            self.job_recovering_s.remove(&l);
            return;
        };
        self.job_goodput.get_or_create(&l).set(g.ratio());
        self.job_failures.get_or_create(&l).set(i64::from(g.failures));
        self.job_steps_lost.get_or_create(&l).set(g.steps_lost as i64);
        self.job_recovering_s.get_or_create(&l).set(g.recovering_ms as f64 / 1e3);
    }

    fn forget_job(&self, job_id: &str) {
        let l = JobLabels { job: job_id.to_owned() };
        self.job_step.remove(&l);
        self.job_loss.remove(&l);
        self.job_tokens_per_s.remove(&l);
    }

    fn rpc_labels(&self, path: &str) -> (String, String) {
        match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some((service, method)) if self.methods.contains(path) => (service.to_owned(), method.to_owned()),
            _ => ("other".to_owned(), "other".to_owned()),
        }
    }

    fn rpc_done(&self, service: String, method: String, code: tonic::Code) {
        self.rpcs.get_or_create(&RpcLabels { service, method, code: code_name(code) }).inc();
    }
}

/// `/package.Service/Method` for every method of the services the coordinator serves.
fn served_methods() -> HashSet<String> {
    let sets = [
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    ];
    let mut out = HashSet::new();
    for bytes in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else { continue };
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    out.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    out
}

/// The canonical upper-case name of a gRPC status code, e.g. `INVALID_ARGUMENT`.
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A [`Store`] that counts what passes through it: new attempts, restarts, checkpoints.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> MeteredStore {
        MeteredStore { inner, metrics }
    }
}

impl Store for MeteredStore {
    fn insert_job(&self, job: NewJob) -> Result<Job> {
        self.inner.insert_job(job)
    }
    fn get_job(&self, id: &str) -> Result<Option<Job>> {
        self.inner.get_job(id)
    }
    fn list_jobs_before(&self, filter: &JobFilter, before: Option<u64>) -> Result<Vec<Job>> {
        self.inner.list_jobs_before(filter, before)
    }
    fn delete_job(&self, id: &str) -> Result<bool> {
        self.inner.delete_job(id)
    }
    fn update_job(&self, job: &Job) -> Result<()> {
        // Progress rewrites RUNNING jobs every step; restarts only change on the way out of RUNNING.
        let before = if job.state == JobState::Running { None } else { self.inner.get_job(&job.id)? };
        self.inner.update_job(job)?;
        if let Some(b) = before
            && job.restarts > b.restarts
        {
            self.metrics.restarts.inc_by(u64::from(job.restarts - b.restarts));
        }
        Ok(())
    }
    fn put_attempt(&self, attempt: &Attempt) -> Result<()> {
        self.inner.put_attempt(attempt)?;
        // An attempt is stored once when it starts (no end yet) and again when it ends.
        if attempt.ended_ms.is_none() {
            self.metrics.attempts_started.inc();
        }
        Ok(())
    }
    fn start_attempt(&self, job: &Job, attempt: &Attempt) -> Result<()> {
        self.inner.start_attempt(job, attempt)?;
        self.metrics.attempts_started.inc();
        Ok(())
    }
    fn attempts(&self, job_id: &str) -> Result<Vec<Attempt>> {
        self.inner.attempts(job_id)
    }
    fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        self.inner.insert_checkpoint(c)?;
        self.metrics.checkpoints_committed.inc();
        Ok(())
    }
    fn latest_checkpoint(&self, job_id: &str) -> Result<Option<Checkpoint>> {
        self.inner.latest_checkpoint(job_id)
    }
    fn put_worker(&self, w: &Worker) -> Result<()> {
        self.inner.put_worker(w)
    }
    fn workers(&self) -> Result<Vec<Worker>> {
        self.inner.workers()
    }
}

/// How often [`follow_progress`] looks for newly running jobs.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Keeps the per-job gauges: watches every RUNNING job's events until it ends, and drops a
/// job's gauges whenever it leaves RUNNING. Returns when `stop` turns true.
pub async fn follow_progress(metrics: Arc<Metrics>, jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    let followed = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut tick = tokio::time::interval(FOLLOW_POLL);
    loop {
        tokio::select! {
            _ = crate::service::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let running = match jobs.list(&JobFilter { states: vec![JobState::Running], limit: 0 }) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("metrics: listing running jobs: {e}");
                continue;
            }
        };
        for job in running {
            let new = followed.lock().map(|mut f| f.insert(job.id.clone())).unwrap_or(false);
            if new {
                let (m, j, s, f) = (metrics.clone(), jobs.clone(), stop.clone(), followed.clone());
                tokio::spawn(async move {
                    follow_job(&m, &j, &job.id, s).await;
                    m.forget_job(&job.id);
                    if let Ok(mut f) = f.lock() {
                        f.remove(&job.id);
                    }
                });
            }
        }
    }
}

async fn follow_job(metrics: &Metrics, jobs: &Jobs, id: &str, mut stop: watch::Receiver<bool>) {
    let Ok(sub) = jobs.watch(id) else { return };
    let Some(mut events) = sub.events else { return };
    loop {
        let event = tokio::select! {
            _ = crate::service::stopped(&mut stop) => return,
            ev = events.recv() => ev,
        };
        match event {
            Ok(JobEvent::Progress(p)) => metrics.progress(id, &p),
            Ok(JobEvent::Job(j)) if j.state.is_terminal() => return,
            Ok(JobEvent::Job(j)) if j.state != JobState::Running => metrics.forget_job(id),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The largest HTTP request head read (hyper's smallest allowed buffer); a scrape's is a few
/// hundred bytes. A longer head is answered 431.
const MAX_HTTP_HEAD: usize = 8 << 10;
/// A client gets this long to send its request and read the answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| crate::Error::io(format!("cannot listen for metrics on {addr}"), e))
}

/// What a scrape reads.
#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    jobs: Arc<Jobs>,
    workers: Arc<Workers>,
}

/// Serves `GET /metrics` (HTTP/1.x, one request per connection) until `stop` turns true.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    jobs: Arc<Jobs>,
    workers: Arc<Workers>,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new().route("/metrics", any(metrics_endpoint)).fallback(elsewhere).with_state(Scrape {
        metrics,
        jobs,
        workers,
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // One request per connection, as scrapers and the tests that read to EOF expect.
    http.keep_alive(false).max_buf_size(MAX_HTTP_HEAD).title_case_headers(true);
    loop {
        let conn = tokio::select! {
            _ = crate::service::stopped(&mut stop) => return,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let serve = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            if let Ok(Err(e)) = tokio::time::timeout(HTTP_TIMEOUT, serve).await {
                tracing::debug!("metrics endpoint: {e}");
            }
        });
    }
}

/// `/metrics`: the exposition to `GET`, 405 to any other method (`HEAD` included, as ever).
async fn metrics_endpoint(State(s): State<Scrape>, method: Method) -> Response {
    if method != Method::GET {
        return not_get();
    }
    match s.metrics.render(&s.jobs, &s.workers) {
        Ok(text) => {
            let ct = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
            ([(header::CONTENT_TYPE, ct)], text).into_response()
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Every other path: 404 to `GET`, 405 to any other method.
async fn elsewhere(method: Method) -> Response {
    if method != Method::GET {
        return not_get();
    }
    plain(StatusCode::NOT_FOUND, "only /metrics is served\n".into())
}

fn not_get() -> Response {
    plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n".into())
}

fn plain(status: StatusCode, body: String) -> Response {
    // `text/plain` exactly, not axum's `text/plain; charset=utf-8`, as the endpoint always said.
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// A tower layer over the gRPC server that counts every call by method and final status.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: http_body::Body + Unpin + Send + 'static,
{
    type Response = http::Response<CountingBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = self.metrics.rpc_labels(req.uri().path());
        let metrics = self.metrics.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            // A failed call usually answers "trailers only": its status is in the headers.
            let early = grpc_status(response.headers());
            let mut pending = Some((metrics, service, method));
            if let Some(code) = early
                && let Some((m, service, method)) = pending.take()
            {
                m.rpc_done(service, method, code);
            }
            Ok(response.map(|b| CountingBody { inner: Some(b), pending }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// A response body that records its call's status once the trailers (or the end) pass by.
pub struct CountingBody<B> {
    inner: Option<B>,
    /// Set until the call has been counted.
    pending: Option<(Arc<Metrics>, String, String)>,
}

impl<B> CountingBody<B> {
    fn finish(&mut self, code: tonic::Code) {
        if let Some((m, service, method)) = self.pending.take() {
            m.rpc_done(service, method, code);
        }
    }
}

impl<B> Drop for CountingBody<B> {
    fn drop(&mut self) {
        // Dropped before its trailers: the client went away (or the server is shutting down).
        if self.inner.is_some() {
            self.finish(tonic::Code::Cancelled);
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for CountingBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(tonic::Code::Internal),
            Poll::Ready(None) => this.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}
