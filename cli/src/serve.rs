//! `bert2bert coordinator`: serve the job and worker APIs until SIGINT or SIGTERM.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::{CliError, CliResult};

#[derive(clap::Args)]
#[command(after_help = "\
Authentication: every JobService call needs `authorization: Bearer <token>`, the token from
--token-file, or else from the BERT2BERT_TOKEN environment variable; one of them is required.
WorkerService calls need the worker token: --worker-token-file, else BERT2BERT_WORKER_TOKEN, else
the same token as clients. grpc.health.v1 and server reflection need no token.

Once listening, the coordinator prints `listening on IP:PORT` on stdout (useful with port 0), then
`metrics on http://IP:PORT/metrics` with --metrics-listen. With --tls-cert/--tls-key clients use
https:// URLs and --tls-ca; with --tls-client-ca they also need --tls-cert/--tls-key.
Jobs live in DIR/coordinator.sqlite; a coordinator restarted on the same --state resumes them.
DIR/worker-secret.key is the key that per-worker secrets derive from: keep it private.

Path policy: with --allow-data/--allow-models/--allow-checkpoints/--allow-logs (or --allow-root
for all four), a job naming a path outside the roots of its kind is refused at submit
(INVALID_ARGUMENT, naming the key). Give workers the same flags: they check again, with symlinks
resolved, before they open anything.")]
pub struct Args {
    /// HOST:PORT to listen on; port 0 picks a free port.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// State directory (created if missing).
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// File holding the client bearer token (first line). Default: $BERT2BERT_TOKEN.
    #[arg(long, value_name = "F")]
    token_file: Option<PathBuf>,
    /// File holding the worker bearer token. Default: $BERT2BERT_WORKER_TOKEN, else the client token.
    #[arg(long, value_name = "F")]
    worker_token_file: Option<PathBuf>,
    /// Seconds without a heartbeat after which a worker is declared dead.
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    heartbeat_timeout: f64,
    /// Seconds a PENDING job waits for `resources.workers` idle workers before it starts with
    /// fewer (at least `resources.min_workers`), e.g. on the survivors of a failure.
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    elastic_wait: f64,
    /// The largest request accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    max_request_bytes: usize,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Also serve plain-HTTP GET /metrics (Prometheus text format) on HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Allowed roots for the paths a job names (`bert2bert coordinator` and `bert2bert worker`).
/// None given: any path. Each flag may be repeated.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PolicyArgs {
    /// Jobs may read data (data.train, data.validation) only under DIR.
    #[arg(long = "allow-data", value_name = "DIR")]
    data: Vec<PathBuf>,
    /// Jobs may read models (model.init, model.encoder, model.decoder) only under DIR.
    #[arg(long = "allow-models", value_name = "DIR")]
    models: Vec<PathBuf>,
    /// Jobs may keep checkpoints (checkpoint.dir, checkpoint.resume_from) only under DIR.
    #[arg(long = "allow-checkpoints", value_name = "DIR")]
    checkpoints: Vec<PathBuf>,
    /// Jobs may write logs (logging.dir) only under DIR.
    #[arg(long = "allow-logs", value_name = "DIR")]
    logs: Vec<PathBuf>,
    /// DIR is allowed for all four kinds of path.
    #[arg(long = "allow-root", value_name = "DIR")]
    root: Vec<PathBuf>,
}

impl PolicyArgs {
    /// The policy; a relative DIR is made absolute against the current directory, and a DIR
    /// that a `..` climbs out of `/` is a usage error.
    pub fn policy(&self) -> CliResult<model::policy::PathPolicy> {
        let cwd = std::env::current_dir()?;
        let dirs = |flag: &str, v: &[PathBuf]| -> CliResult<Vec<PathBuf>> {
            v.iter()
                .chain(&self.root)
                .map(|d| {
                    model::policy::normalize(&cwd.join(d))
                        .ok_or_else(|| CliError::usage(format!("--{flag} {}: not a directory path", d.display())))
                })
                .collect()
        };
        Ok(model::policy::PathPolicy {
            data: dirs("allow-data", &self.data)?,
            models: dirs("allow-models", &self.models)?,
            checkpoints: dirs("allow-checkpoints", &self.checkpoints)?,
            logs: dirs("allow-logs", &self.logs)?,
        })
    }
}

/// A token from a file (its first line) or else an environment variable.
pub fn read_token(file: Option<&PathBuf>, env: &str) -> CliResult<Option<String>> {
    let token = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| CliError::usage(format!("cannot read token file {}: {e}", f.display())))?;
            Some(text.lines().next().unwrap_or("").trim().to_owned())
        }
        None => std::env::var(env).ok().map(|t| t.trim().to_owned()),
    };
    match token {
        Some(t) if t.is_empty() => Err(CliError::usage(match file {
            Some(f) => format!("token file {} is empty", f.display()),
            None => format!("{env} is empty"),
        })),
        t => Ok(t),
    }
}

fn resolve(flag: &str, listen: &str) -> CliResult<SocketAddr> {
    listen
        .to_socket_addrs()
        .map_err(|e| CliError::usage(format!("{flag} {listen}: {e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| CliError::usage(format!("{flag} {listen}: no address")))
}

pub fn run(a: Args) -> CliResult {
    let listen = resolve("--listen", &a.listen)?;
    let client = read_token(a.token_file.as_ref(), "BERT2BERT_TOKEN")?
        .ok_or_else(|| CliError::usage("no token: pass --token-file F or set BERT2BERT_TOKEN"))?;
    let worker = read_token(a.worker_token_file.as_ref(), "BERT2BERT_WORKER_TOKEN")?.unwrap_or_else(|| client.clone());
    if !(a.heartbeat_timeout.is_finite() && a.heartbeat_timeout > 0.0) {
        return Err(CliError::usage("--heartbeat-timeout must be a positive number of seconds"));
    }
    if !(a.elastic_wait.is_finite() && a.elastic_wait >= 0.0) {
        return Err(CliError::usage("--elastic-wait must be a number of seconds, 0 or more"));
    }
    let mut config = coordinator::Config::new(listen, a.state, client);
    config.elastic_wait = Duration::from_secs_f64(a.elastic_wait);
    config.worker_token = worker;
    config.heartbeat_timeout = Duration::from_secs_f64(a.heartbeat_timeout);
    config.heartbeat_interval = (config.heartbeat_timeout / 5).min(config.heartbeat_interval);
    config.max_request_bytes = a.max_request_bytes;
    config.path_policy = a.policy.policy()?;
    config.metrics_listen = a.metrics_listen.as_deref().map(|m| resolve("--metrics-listen", m)).transpose()?;
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let tls = coordinator::tls::Tls::from_files(cert, key, a.tls_client_ca.as_deref());
        config.tls = Some(tls?);
    }

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let running = coordinator::start(config).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {}", running.addr)?;
            if let Some(m) = running.metrics_addr {
                writeln!(out, "metrics on http://{m}/metrics")?;
            }
            out.flush()?;
        }
        Ok(running.run_until(shutdown_signal()).await?)
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
