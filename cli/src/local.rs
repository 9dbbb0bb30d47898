//! `bert2bert train JOB.yaml --workers N` with N > 1: a coordinator in this process on
//! 127.0.0.1:0 with a random token, N `bert2bert worker` child processes, and the job submitted
//! and followed to its end. The children are killed when this returns, however it returns.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use model::job::JobSpec;
use proto::v1;
use proto::v1::job_service_client::JobServiceClient;

use crate::remote::{bearer, channel, follow, status_error, succeeded};
use crate::{CliError, CliResult, Context};

/// Child processes, killed and reaped on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// 128 bits from the operating system's generator, as hex: the token the children present.
fn random_token() -> Result<String, CliError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| CliError::failure(format!("no randomness for the worker token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn run(mut spec: JobSpec, workers: usize) -> CliResult {
    if spec.resources.device != model::job::Device::Cpu {
        return Err(CliError::usage("--workers above 1 runs CPU workers only in this build (resources.device: cpu)"));
    }
    spec.resources.workers = workers;
    spec.resources.min_workers = spec.resources.min_workers.clamp(1, workers);
    let token = random_token()?;
    // The coordinator's state lives only as long as this run: removed on drop, however it ends.
    let state = tempfile::Builder::new().prefix("bert2bert-train-").tempdir()?;
    let exe = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let config = coordinator::Config::new(([127, 0, 0, 1], 0).into(), state.path(), token.clone());
        let running = coordinator::start(config).await.context("coordinator")?;
        let url = running.url();
        eprintln!("coordinator on {url}; starting {workers} workers");
        let mut children = Children(Vec::with_capacity(workers));
        for _ in 0..workers {
            let child = Command::new(&exe)
                .args(["worker", "--coordinator", &url, "--exit-on-stdin-close"])
                .env("BERT2BERT_WORKER_TOKEN", &token)
                .stdin(Stdio::piped())
                .spawn()?;
            children.0.push(child);
        }
        let result = submit_and_follow(&url, &token, &spec, &mut children).await;
        drop(children);
        if let Err(e) = running.shutdown().await {
            tracing::warn!("coordinator shutdown: {e}");
        }
        result
    })
}

async fn submit_and_follow(url: &str, token: &str, spec: &JobSpec, children: &mut Children) -> CliResult {
    let mut c =
        JobServiceClient::with_interceptor(channel(url, &Default::default()).await?, bearer(Some(token.to_owned()))?);
    let req = v1::SubmitJobRequest { job_yaml: spec.to_yaml() };
    let job = c.submit(req).await.map_err(status_error)?.into_inner().job.unwrap_or_default();
    eprintln!("submitted {}", job.id);
    let last = tokio::select! {
        r = follow(&mut c, &job.id, true) => r?,
        e = watch_children(children) => return Err(e),
    };
    succeeded(&last)?;
    eprintln!("job {} SUCCEEDED at step {}", last.id, last.step);
    Ok(())
}

/// Resolves with an error when a worker process exits (they only exit on their own when their
/// stdin, held by this process, closes).
async fn watch_children(children: &mut Children) -> CliError {
    loop {
        for (i, c) in children.0.iter_mut().enumerate() {
            match c.try_wait() {
                Ok(Some(status)) => return CliError::failure(format!("worker process {i} exited ({status})")),
                Ok(None) => {}
                Err(e) => return CliError::failure(format!("worker process {i}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
