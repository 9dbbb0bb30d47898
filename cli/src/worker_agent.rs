//! `bert2bert worker`: the flags of a worker agent, and the process around it (signals, the
//! worker token, `--exit-on-stdin-close`); the agent itself is the `agent` crate.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::{CliError, CliResult};

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
    /// `cpu`, or `cuda[:N]` for jobs with `device: cuda` (NCCL between the ranks). A bare `cuda`
    /// takes N from SLURM_LOCALID, else LOCAL_RANK (one worker per GPU under srun or torchrun),
    /// else 0; it is 0 when CUDA_VISIBLE_DEVICES lists a single GPU.
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
    /// Serve plain-HTTP probes on HOST:PORT: GET /healthz is 200 while the agent's loop runs
    /// (503 once it has been silent for twice --collective-timeout, at least 60 s), GET /readyz
    /// is 200 while the worker is registered with the coordinator. Default: no server.
    #[arg(long, value_name = "HOST:PORT")]
    health_listen: Option<String>,
    /// Do not keep the training state in host memory when an attempt ends before its job (a
    /// peer died): saves a copy of the parameters and optimizer moments, but the job's next
    /// attempt then resumes from its last checkpoint and redoes the steps since.
    #[arg(long)]
    no_peer_state: bool,
    #[command(flatten)]
    policy: crate::serve::PolicyArgs,
}

/// Checks the flags, reads the token, installs the signal handlers and runs the agent.
pub fn run(a: Args) -> CliResult {
    let launcher = agent::device::LauncherEnv::from_process();
    let device = agent::device::resolve(&a.device, &launcher).map_err(CliError::usage)?;
    if !(a.collective_timeout > 0.0 && a.collective_timeout.is_finite()) {
        return Err(CliError::usage("--collective-timeout must be a positive number of seconds"));
    }
    let connect_timeout = match a.connect_timeout {
        Some(s) if (0.0..1e9).contains(&s) => Some(Duration::from_secs_f64(s)),
        Some(_) => return Err(CliError::usage("--connect-timeout must be a number of seconds, 0 or more")),
        None => None,
    };
    let policy = a.policy.policy()?;
    let health_listener = a.health_listen.as_deref().map(bind_health).transpose()?;
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
    let shutdown = Arc::new(AtomicBool::new(false));
    watch_signals(shutdown.clone())?;
    let config = agent::Config {
        coordinator: a.coordinator,
        token,
        tls: a.tls.files(),
        device,
        ring_listen: a.ring_listen,
        ring_advertise: a.ring_advertise,
        collective_timeout: Duration::from_secs_f64(a.collective_timeout),
        connect_timeout,
        policy,
        health_listener,
        keep_state: !a.no_peer_state,
        shutdown,
    };
    Ok(agent::run(config)?)
}

/// Binds `--health-listen` before anything else starts, so that a bad address fails at once.
fn bind_health(addr: &str) -> CliResult<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let parsed = addr.to_socket_addrs().ok().and_then(|mut it| it.next());
    let addr = parsed.ok_or_else(|| CliError::usage(format!("--health-listen {addr}: not a HOST:PORT address")))?;
    std::net::TcpListener::bind(addr)
        .map_err(|e| CliError::failure(format!("--health-listen {addr}: cannot listen: {e}")))
}

/// SIGTERM and SIGINT: the first sets `shutdown` (the agent finishes its step, reports and
/// deregisters); a second one exits at once. The handlers are installed before this returns,
/// so that no signal meets the default action (death) once the agent runs.
fn watch_signals(shutdown: Arc<AtomicBool>) -> CliResult {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if shutdown.swap(true, Ordering::SeqCst) {
                    tracing::warn!("second signal: exiting now");
                    std::process::exit(1);
                }
                tracing::warn!("signal received: finishing the current step, then leaving (signal again to exit now)");
            }
        })
    });
    Ok(())
}
