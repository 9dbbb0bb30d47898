//! `bert2bert submit | watch | status | list | cancel | delete`: JobService clients of a running
//! coordinator.

use std::path::PathBuf;
use std::time::Duration;

use model::job::JobSpec;
use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use agent::client::Bearer;
pub(crate) use agent::client::{bearer, channel, status_error};

use crate::watch::Display;
pub(crate) use crate::watch::state_name;
use crate::{CliError, CliResult};

/// Where the coordinator is and how to authenticate.
#[derive(clap::Args, Clone)]
pub struct Conn {
    /// The coordinator, e.g. http://10.0.0.5:7070 (a bare HOST:PORT means http).
    #[arg(long, env = "BERT2BERT_COORDINATOR", value_name = "URL")]
    coordinator: String,
    /// File holding the client bearer token (first line). Default: $BERT2BERT_TOKEN.
    #[arg(long, value_name = "F")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The job file (YAML); it is checked here first, then sent with absolute paths.
    job: PathBuf,
    #[command(flatten)]
    conn: Conn,
    /// Show progress and events on stderr until the job ends: a live bar on a terminal, one
    /// line per event otherwise.
    #[arg(long)]
    watch: bool,
    /// Wait for the job to end; exit 0 only if it SUCCEEDED.
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
#[command(after_help = "Exits 0 if the job SUCCEEDED, 1 if it failed or was cancelled, 2 if there is no such job.")]
pub struct WatchArgs {
    job_id: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    job_id: String,
    #[command(flatten)]
    conn: Conn,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: Conn,
    /// One JSON object (`{"jobs": [..]}`) on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct CancelArgs {
    job_id: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(clap::Args)]
#[command(after_help = "Only SUCCEEDED, FAILED or CANCELLED jobs can be deleted (cancel a running one first). \
    Checkpoint files are left where they are.")]
pub struct DeleteArgs {
    job_id: String,
    #[command(flatten)]
    conn: Conn,
}

pub(crate) type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

fn runtime() -> CliResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn connect(conn: &Conn) -> CliResult<Client> {
    let token = crate::serve::read_token(conn.token_file.as_ref(), "BERT2BERT_TOKEN")?;
    let channel = channel(&conn.coordinator, &conn.tls.files()).await?;
    Ok(JobServiceClient::with_interceptor(channel, bearer(token)?))
}

fn is_terminal(j: &v1::Job) -> bool {
    matches!(j.state(), v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled)
}

fn job_json(j: &v1::Job) -> serde_json::Value {
    json!({
        "id": j.id, "name": j.name, "state": state_name(j), "step": j.step, "total_steps": j.total_steps,
        "restarts": j.restarts, "reason": j.reason, "checkpoint_step": j.checkpoint_step,
        "workers": j.workers, "min_workers": j.min_workers,
        "created_unix_ms": j.created_unix_ms, "updated_unix_ms": j.updated_unix_ms,
        "goodput": j.goodput.as_ref().map(|g| json!({
            "ratio": g.ratio, "productive_s": g.productive_s, "wall_s": g.wall_s, "failures": g.failures,
            "steps_lost": g.steps_lost, "recovering_s": g.recovering_s,
        })),
    })
}

pub fn submit(a: SubmitArgs) -> CliResult {
    let spec = JobSpec::from_file(&a.job)?;
    runtime()?.block_on(async move {
        let mut c = connect(&a.conn).await?;
        let req = v1::SubmitJobRequest { job_yaml: spec.to_yaml() };
        let job = c.submit(req).await.map_err(status_error)?.into_inner().job.unwrap_or_default();
        println!("{}", job.id);
        if !(a.wait || a.watch) {
            return Ok(());
        }
        let last = follow(&mut c, &job.id, a.watch).await?;
        if a.wait { succeeded(&last) } else { Ok(()) }
    })
}

/// `watch`: follows a job to its end; exits 0 only if it SUCCEEDED.
pub fn watch(a: WatchArgs) -> CliResult {
    runtime()?.block_on(async move {
        let mut c = connect(&a.conn).await?;
        let last = follow(&mut c, &a.job_id, true).await?;
        succeeded(&last)
    })
}

/// Ok if the job SUCCEEDED, else a failure (exit 1) saying how it ended and why.
pub(crate) fn succeeded(last: &v1::Job) -> CliResult {
    if last.state() == v1::JobState::Succeeded {
        return Ok(());
    }
    let why = if last.reason.is_empty() { String::new() } else { format!(": {}", last.reason) };
    Err(CliError::failure(format!("job {} {}{why}", last.id, state_name(last))))
}

/// Follows a job to its end through Watch, reconnecting while the coordinator is away (e.g.
/// restarting); returns the job in its terminal state. With `print`, shows it on stderr (see
/// `watch::Display`).
pub(crate) async fn follow(c: &mut Client, id: &str, print: bool) -> CliResult<v1::Job> {
    use v1::watch_job_response::Event;
    let mut display = Display::new(print);
    let mut backoff = Duration::from_millis(200);
    loop {
        let stream = c.watch(v1::WatchJobRequest { job_id: id.to_owned() }).await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if retryable(&s) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(s) => return Err(status_error(s).into()),
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    backoff = Duration::from_millis(200);
                    let Some(event) = msg.event else { continue };
                    display.show(&event);
                    if let Event::Job(j) = event
                        && is_terminal(&j)
                    {
                        display.finish();
                        return Ok(j);
                    }
                }
                // The stream ended without a terminal state or broke: ask again.
                Ok(None) => break,
                Err(s) if retryable(&s) => break,
                Err(s) => return Err(status_error(s).into()),
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal)
}

pub fn status(a: StatusArgs) -> CliResult {
    runtime()?.block_on(async move {
        let mut c = connect(&a.conn).await?;
        let req = v1::GetJobRequest { job_id: a.job_id.clone() };
        let j = c.get(req).await.map_err(status_error)?.into_inner().job.unwrap_or_default();
        if a.json {
            println!("{}", job_json(&j));
        } else {
            println!("id:          {}", j.id);
            println!("name:        {}", j.name);
            println!("state:       {}", state_name(&j));
            println!("step:        {}/{}", j.step, j.total_steps);
            println!("checkpoint:  {}", j.checkpoint_step);
            println!("workers:     {} (min {})", j.workers, j.min_workers);
            println!("restarts:    {}", j.restarts);
            if let Some(g) = &j.goodput {
                println!(
                    "goodput:     {:.1}% ({:.1} s of {:.1} s in kept steps; {} failures, {} steps lost, {:.1} s recovering)",
                    100.0 * g.ratio,
                    g.productive_s,
                    g.wall_s,
                    g.failures,
                    g.steps_lost,
                    g.recovering_s
                );
            }
            if !j.reason.is_empty() {
                println!("reason:      {}", j.reason);
            }
        }
        Ok(())
    })
}

pub fn list(a: ListArgs) -> CliResult {
    runtime()?.block_on(async move {
        let mut c = connect(&a.conn).await?;
        let jobs = all_jobs(&mut c).await?;
        if a.json {
            println!("{}", json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() }));
        } else {
            let now_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            print!("{}", table(&jobs, now_ms));
        }
        Ok(())
    })
}

/// Every job, newest first, page after page.
async fn all_jobs(c: &mut Client) -> CliResult<Vec<v1::Job>> {
    let (mut jobs, mut token) = (Vec::new(), String::new());
    loop {
        let req = v1::ListJobsRequest { page_token: token.clone(), ..Default::default() };
        let page = c.list(req).await.map_err(status_error)?.into_inner();
        jobs.extend(page.jobs);
        // Tokens move down the job numbers; one that does not move would loop forever.
        if page.next_page_token.is_empty() || page.next_page_token == token {
            return Ok(jobs);
        }
        token = page.next_page_token;
    }
}

/// Jobs as a table with aligned columns; UPDATED is the age of the last change at `now_ms`.
fn table(jobs: &[v1::Job], now_ms: i64) -> String {
    let header = ["ID", "NAME", "STATE", "STEP", "WORKERS", "RESTARTS", "UPDATED", "REASON"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for j in jobs {
        rows.push(vec![
            j.id.clone(),
            j.name.clone(),
            state_name(j).to_owned(),
            format!("{}/{}", j.step, j.total_steps),
            j.workers.to_string(),
            j.restarts.to_string(),
            crate::watch::age(j.updated_unix_ms, now_ms),
            j.reason.clone(),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn cancel(a: CancelArgs) -> CliResult {
    runtime()?.block_on(async move {
        let mut c = connect(&a.conn).await?;
        let req = v1::CancelJobRequest { job_id: a.job_id.clone(), reason: String::new() };
        let j = c.cancel(req).await.map_err(status_error)?.into_inner().job.unwrap_or_default();
        println!("{} {}", j.id, state_name(&j));
        Ok(())
    })
}

pub fn delete(a: DeleteArgs) -> CliResult {
    runtime()?.block_on(async move {
        let mut c = connect(&a.conn).await?;
        c.delete_job(v1::DeleteJobRequest { job_id: a.job_id.clone() }).await.map_err(status_error)?;
        println!("{} deleted", a.job_id);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up() {
        let now = 1_800_000_000_000;
        let a = v1::Job {
            id: "job-1".into(),
            name: "a".into(),
            state: 1,
            total_steps: 10,
            workers: 2,
            updated_unix_ms: now - 12_000,
            ..Default::default()
        };
        let b = v1::Job {
            id: "job-12".into(),
            name: "longer".into(),
            state: 5,
            reason: "x".into(),
            workers: 16,
            updated_unix_ms: now - 300_000,
            ..a.clone()
        };
        let t = table(&[a, b], now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("STATE").or_else(|| l.find("PENDING")).or_else(|| l.find("CANCELLED"));
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
        let at = |l: &str, cell: &str| l.find(cell).unwrap_or_else(|| panic!("{cell:?} not in {l:?}"));
        assert_eq!(at(lines[0], "WORKERS"), at(lines[1], " 2 ") + 1);
        assert_eq!(at(lines[0], "WORKERS"), at(lines[2], " 16 ") + 1);
        assert_eq!(at(lines[0], "UPDATED"), at(lines[1], "12s ago"));
        assert_eq!(at(lines[0], "UPDATED"), at(lines[2], "5m ago"));
    }
}
