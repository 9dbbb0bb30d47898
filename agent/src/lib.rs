//! The bert2bert worker agent (`bert2bert worker`): it registers with the coordinator,
//! heartbeats in the background, polls for an assignment, joins the CPU ring (or NCCL
//! communicator) of its gang, trains its rank, and reports progress, checkpoints and the
//! outcome; then it polls again, until [`Config::shutdown`] is set.
//!
//! The gRPC client runs on a tokio runtime made here; the trainer runs synchronously on the
//! calling thread, which calls into the runtime with `block_on` to report. Process concerns stay
//! with the caller: signals (which set the shutdown flag), exit codes, reading tokens.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1;
use proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use worker::ring::RingCollective;

mod attempt;
pub mod client;
pub mod device;
mod error;
pub mod health;
mod nccl;
mod report;
mod retry;
mod session;

pub use client::TlsFiles;
pub use device::LocalDevice;
pub use error::{Error, Result};
pub use health::Health;

/// Everything the agent needs, already read and checked by the caller.
pub struct Config {
    /// The coordinator, e.g. http://10.0.0.5:7070 (a bare HOST:PORT means http).
    pub coordinator: String,
    /// The worker bearer token; `None`: send none.
    pub token: Option<String>,
    pub tls: TlsFiles,
    /// The device to train on; a CUDA device is opened before registering.
    pub device: LocalDevice,
    /// HOST:PORT where the CPU ring listens for the left neighbour; port 0 picks a free port.
    pub ring_listen: String,
    /// The address peers dial to reach this worker's ring; required when `ring_listen` is a
    /// wildcard address.
    pub ring_advertise: Option<String>,
    /// How long a collective (or forming the ring) may take before a peer counts as dead.
    pub collective_timeout: Duration,
    /// Give up when the coordinator cannot be reached and registered with within this long of
    /// starting; `None`: keep trying.
    pub connect_timeout: Option<Duration>,
    /// Where assignments may point (`--allow-*`).
    pub policy: model::policy::PathPolicy,
    /// `--health-listen`, already bound: serves `/healthz` and `/readyz` ([`health`]) while the
    /// agent runs.
    pub health_listener: Option<TcpListener>,
    /// Keep the training state in host memory when an attempt ends before its job, so that
    /// the next attempt can resume from it (recovery from peers) rather than from a checkpoint.
    pub keep_state: bool,
    /// Set it to leave: the current step finishes (rank 0 then checkpoints), the attempt is
    /// reported failed as a worker shutdown, the worker deregisters and [`run`] returns `Ok`.
    pub shutdown: Arc<AtomicBool>,
}

impl Config {
    /// A CPU worker of `coordinator` with the defaults of `bert2bert worker`.
    pub fn new(coordinator: impl Into<String>) -> Config {
        Config {
            coordinator: coordinator.into(),
            token: None,
            tls: TlsFiles::default(),
            device: LocalDevice::Cpu,
            ring_listen: "127.0.0.1:0".into(),
            ring_advertise: None,
            collective_timeout: Duration::from_secs(60),
            connect_timeout: None,
            policy: model::policy::PathPolicy::default(),
            health_listener: None,
            keep_state: true,
            shutdown: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Who this worker is to the coordinator: its id and the secret Register gave with it.
#[derive(Clone, Default)]
pub(crate) struct Me {
    id: String,
    secret: String,
}

pub(crate) type Client = WorkerServiceClient<InterceptedService<Channel, client::Bearer>>;

/// What the heartbeat task reports and can abort.
#[derive(Default)]
pub(crate) struct Current {
    me: Me,
    /// Where assignments may point (`--allow-*`).
    policy: Arc<model::policy::PathPolicy>,
    job: Option<(String, u32)>,
    step: u64,
    ring: Option<Arc<RingCollective>>,
    /// `--device cuda:N`: the device index and its backend, opened once at start.
    cuda: Option<(usize, Arc<device::Cuda>)>,
    /// The coordinator said STOP (or forgot us): abandon the attempt.
    stop: bool,
    reregister: bool,
    /// [`Config::shutdown`]: finish the step, checkpoint (rank 0), report, leave.
    shutdown: Arc<AtomicBool>,
    /// What `--health-listen` answers; beaten by this thread, never by the heartbeat task.
    health: Arc<Health>,
    /// The training state kept from an attempt that ended before its job did (recovery from
    /// peers, [`worker::peer`]): offered to the coordinator until the next assignment.
    held: Option<Held>,
    /// [`Config::keep_state`].
    keep_state: bool,
}

/// A job's training state in host memory.
pub(crate) struct Held {
    job_id: String,
    snapshot: worker::peer::Snapshot,
}

impl Current {
    /// What this worker tells the coordinator it holds.
    fn held_state(&self) -> Option<v1::HeldState> {
        self.held.as_ref().map(|h| v1::HeldState { job_id: h.job_id.clone(), step: h.snapshot.step })
    }
}

pub(crate) fn take<T>(current: &Mutex<Current>, f: impl FnOnce(&mut Current) -> T) -> T {
    let mut c = current.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut c)
}

/// Runs the agent until `config.shutdown` is set (then `Ok`), or until it cannot go on: a
/// device that cannot be opened, a bad setting, a coordinator that refuses this worker or cannot
/// be reached within `connect_timeout`.
pub fn run(mut config: Config) -> Result {
    // A machine without a driver is told so (usage) before the worker registers.
    let cuda = nccl::open(config.device)?;
    let listen: SocketAddr = config
        .ring_listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| Error::usage(format!("--ring-listen {}: not a HOST:PORT address", config.ring_listen)))?;
    let listener = TcpListener::bind(listen)?;
    let ring_address = advertised_ring_address(listener.local_addr()?, config.ring_advertise.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let shutdown = config.shutdown.clone();
    let policy = Arc::new(config.policy.clone());
    let health = Arc::new(Health::new(Health::stale_limit(config.collective_timeout)));
    let (stop_health, stopped) = tokio::sync::watch::channel(false);
    let server = config.health_listener.take().map(|l| rt.spawn(health::serve(l, health.clone(), stopped)));
    let keep_state = config.keep_state;
    let current =
        Current { cuda, policy, shutdown: shutdown.clone(), health: health.clone(), keep_state, ..Current::default() };
    let current = Arc::new(Mutex::new(current));
    let ran = serve_coordinator(&rt, &config, &listener, ring_address, &current);
    // Not ready once the loop is over, whatever ended it; then the port closes.
    health.set_registered(false);
    let _ = stop_health.send(true);
    if let Some(server) = server {
        let _ = rt.block_on(server);
    }
    ran
}

/// Connects, registers, heartbeats and polls for assignments until the shutdown flag is set.
fn serve_coordinator(
    rt: &tokio::runtime::Runtime,
    config: &Config,
    listener: &TcpListener,
    ring_address: SocketAddr,
    current: &Arc<Mutex<Current>>,
) -> Result {
    let deadline = config.connect_timeout.map(|t| Instant::now() + t);
    let health = take(current, |c| c.health.clone());
    let channel = connect(rt, &config.coordinator, &config.tls, deadline, &health)?;
    let client: Client = WorkerServiceClient::with_interceptor(channel, client::bearer(config.token.clone())?);
    let interval = session::register(rt, &client, ring_address, current, deadline)?;
    let heartbeats = rt.spawn(session::heartbeats(client.clone(), current.clone(), interval));
    let ran = poll(rt, &client, listener, ring_address, current, config.collective_timeout);
    heartbeats.abort();
    ran
}

/// Polls for assignments and runs them until the shutdown flag is set.
fn poll(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    listener: &TcpListener,
    ring_address: SocketAddr,
    current: &Arc<Mutex<Current>>,
    timeout: Duration,
) -> Result {
    let (shutdown, health) = take(current, |c| (c.shutdown.clone(), c.health.clone()));
    let mut backoff = retry::Backoff::default();
    loop {
        health.beat();
        if shutdown.load(Ordering::SeqCst) {
            tracing::info!("shutting down");
            health.set_registered(false);
            session::deregister(rt, client, &take(current, |c| c.me.clone()));
            return Ok(());
        }
        if take(current, |c| std::mem::take(&mut c.reregister)) {
            session::register(rt, client, ring_address, current, None)?;
        }
        let (me, held_state) = take(current, |c| (c.me.clone(), c.held_state()));
        let req = v1::GetAssignmentRequest {
            worker_id: me.id,
            wait_ms: 2_000,
            worker_secret: me.secret,
            held_state,
            ..Default::default()
        };
        let assignment = match rt.block_on(client.clone().get_assignment(req)) {
            Ok(r) => {
                backoff.reset();
                let r = r.into_inner();
                if r.release_held_state && r.assignment.is_none() {
                    take(current, |c| c.held = None);
                    tracing::info!("the coordinator will not use the training state kept in memory: freed");
                }
                r.assignment
            }
            // The coordinator no longer knows our secret (its state directory was replaced), or
            // no longer takes our token: registering again either recovers or fails for good.
            Err(s) if s.code() == Code::Unauthenticated => {
                tracing::warn!("GetAssignment: {}; registering again", s.message());
                session::must_reregister(current);
                continue;
            }
            Err(s) if s.code() == Code::PermissionDenied => return Err(client::status_error(s)),
            Err(s) => {
                let wait = backoff.next_delay();
                tracing::warn!("GetAssignment: {}; retry {} in {wait:.1?}", s.message(), backoff.retries);
                std::thread::sleep(wait);
                continue;
            }
        };
        let Some(asg) = assignment else { continue };
        attempt::attempt(rt, client, listener, current, asg, timeout);
    }
}

/// A channel to the coordinator, retried with backoff until `deadline` (`None`: for ever).
/// A bad URL or TLS setting is a usage error at once.
fn connect(
    rt: &tokio::runtime::Runtime,
    url: &str,
    tls: &TlsFiles,
    deadline: Option<Instant>,
    health: &Health,
) -> Result<Channel> {
    let mut backoff = retry::Backoff::default();
    loop {
        health.beat();
        match rt.block_on(client::channel(url, tls)) {
            Ok(ch) => return Ok(ch),
            Err(e) if e.is_usage() => return Err(e),
            Err(e) => {
                let Some(wait) = retry::wait_within(&mut backoff, deadline) else {
                    return Err(e.context(format!("gave up reaching the coordinator at {url} (--connect-timeout)")));
                };
                tracing::warn!("{e}; retry {} in {wait:.1?}", backoff.retries);
                std::thread::sleep(wait);
            }
        }
    }
}

/// The ring address registered with the coordinator: `advertise` (an IP, or a name resolved
/// here) with the listening port, else the listening address itself, which must then be one a
/// peer can dial (a wildcard like 0.0.0.0 is not).
fn advertised_ring_address(listening: SocketAddr, advertise: Option<&str>) -> Result<SocketAddr> {
    let Some(host) = advertise.map(str::trim) else {
        if listening.ip().is_unspecified() {
            return Err(Error::usage(format!(
                "--ring-listen {listening} listens on every interface: pass --ring-advertise HOST, the \
                 address peers reach this worker at (in Kubernetes, the pod IP)"
            )));
        }
        return Ok(listening);
    };
    let bad = |why: String| Error::usage(format!("--ring-advertise {host}: {why}"));
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

#[cfg(test)]
mod tests {
    use super::advertised_ring_address;
    use std::net::SocketAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn advertised(listening: SocketAddr, host: Option<&str>) -> SocketAddr {
        advertised_ring_address(listening, host).unwrap_or_else(|e| panic!("{host:?}: {e}"))
    }

    #[test]
    fn advertise_keeps_the_listening_port_and_needs_a_dialable_host() {
        let wildcard = addr("0.0.0.0:7071");
        assert_eq!(advertised(wildcard, Some("10.1.2.3")), addr("10.1.2.3:7071"));
        assert_eq!(advertised(addr("[::]:7071"), Some("[fd00::5]")), addr("[fd00::5]:7071"));
        assert_eq!(advertised(addr("127.0.0.1:9"), None), addr("127.0.0.1:9"));
        assert_eq!(advertised(wildcard, Some("localhost")).port(), 7071);
        let no_host = advertised_ring_address(wildcard, None).unwrap_err();
        assert_eq!(no_host.exit_code(), 2);
        assert!(no_host.to_string().contains("--ring-advertise"), "{no_host}");
        for bad in ["0.0.0.0", "no-such-host.invalid"] {
            let e = advertised_ring_address(wildcard, Some(bad)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
