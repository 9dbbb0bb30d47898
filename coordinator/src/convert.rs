//! Every conversion between protobuf messages and domain types, in one place. Requests become
//! checked domain values with `TryFrom`; a bad field is `Error::InvalidArgument` naming it.

use std::net::SocketAddr;
use std::path::Path;

use jobspec::JobSpec;
use prost::Message;
use proto::v1;

use crate::domain::{
    EvalMetrics, FailureKind, Job, JobEvent, JobFilter, JobState, Progress, WorkerEvent, WorkerEventKind, job_number,
};
use crate::error::{Error, Result};
use crate::scheduler::{Assignment, AttemptRef, HeldState};
use crate::workers::{Command, Registration};

/// The longest id, name or address field a request may carry.
const MAX_FIELD: usize = 256;

fn id_field(field: &str, v: &str) -> Result<String> {
    let v = v.trim();
    if v.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if v.len() > MAX_FIELD || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(Error::invalid(field, format!("`{v}` is not an id (1 to {MAX_FIELD} of A-Z a-z 0-9 - _ .)")));
    }
    Ok(v.to_owned())
}

fn text_field(field: &str, v: String) -> Result<String> {
    if v.len() > MAX_FIELD {
        return Err(Error::invalid(field, format!("longer than {MAX_FIELD} bytes")));
    }
    Ok(v)
}

/// A submitted job, parsed and validated.
pub struct Submit(pub JobSpec);

/// The job file size limit, checked before anything reads the text; cheap enough to run on
/// the executor, before the request waits for a parse slot (`admission`).
pub fn check_job_size(r: &v1::SubmitJobRequest) -> Result<()> {
    let (n, max) = (r.job_yaml.len(), jobspec::MAX_JOB_BYTES);
    if n > max {
        return Err(Error::invalid("job_yaml", format!("{n} bytes, over the limit of {max} bytes")));
    }
    Ok(())
}

impl TryFrom<v1::SubmitJobRequest> for Submit {
    type Error = Error;
    fn try_from(r: v1::SubmitJobRequest) -> Result<Self> {
        check_job_size(&r)?;
        // The origin names the field in every message: "job_yaml: training.steps: ...".
        JobSpec::from_str(&r.job_yaml, Path::new("job_yaml")).map(Submit).map_err(|e| match e {
            jobspec::Error::Input { .. } => Error::InvalidArgument(e.to_string()),
            other => Error::Internal(other.to_string()),
        })
    }
}

/// INVALID_ARGUMENT, naming the key (`job_yaml: data.train: ...`), for a job that names a
/// path outside the allowed roots.
pub fn check_policy(policy: &jobspec::policy::PathPolicy, spec: &JobSpec) -> Result<()> {
    policy.check(spec).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// The job's lengths against its model's config.json, when the coordinator can read it (the
/// model may exist only on the workers' machines: then the workers check it at start).
pub fn check_model(spec: &JobSpec) -> Result<()> {
    match check_positions(spec) {
        Ok(()) => Ok(()),
        Err(e @ jobspec::Error::Input { .. }) => {
            // Length errors name the job (`job_yaml: data...`); config.json errors name that file.
            let msg = e.to_string();
            let msg = if msg.starts_with("job_yaml") { msg } else { format!("job_yaml: model: {msg}") };
            Err(Error::InvalidArgument(msg))
        }
        Err(e) => {
            tracing::debug!("job not checked against its model here: {e}");
            Ok(())
        }
    }
}

/// The largest config.json read (as `model::config` allows).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// `JobSpec::check_positions` with the `max_position_embeddings` of the model's config files.
/// The coordinator reads only that key, without the ML crates; the workers validate the whole
/// config (`model::job::JobModelExt`) before they train.
fn check_positions(spec: &JobSpec) -> jobspec::Result<()> {
    let (enc_file, dec_file) = spec.model_config_files();
    let (enc, dec) = match &spec.model {
        jobspec::ModelSpec::Init(_) => {
            let v = read_config(&enc_file)?;
            (positions(&v, Some("encoder"), &enc_file)?, positions(&v, Some("decoder"), &dec_file)?)
        }
        jobspec::ModelSpec::Inline { decoder, .. } => {
            let enc = positions(&read_config(&enc_file)?, None, &enc_file)?;
            // A random decoder takes the encoder's config.
            let dec = match decoder {
                None => enc,
                Some(_) => positions(&read_config(&dec_file)?, None, &dec_file)?,
            };
            (enc, dec)
        }
    };
    spec.check_positions((&enc_file, enc), (&dec_file, dec))
}

fn read_config(file: &Path) -> jobspec::Result<serde_json::Value> {
    let bytes = jobspec::error::read_bounded(file, MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| jobspec::Error::input(file, format!("invalid JSON: {e}")))
}

/// The positions a BERT or RoBERTa config can embed (`max_position_embeddings`, less
/// `pad_token_id + 1` for RoBERTa: `model::config::BertConfig::max_positions`), or of its
/// `stack` (`encoder`, `decoder`) in an encoder-decoder config; errors are worded as
/// `model::config`'s.
fn positions(v: &serde_json::Value, stack: Option<&str>, file: &Path) -> jobspec::Result<usize> {
    let (v, within) = match stack {
        Some(key) => match v.get(key) {
            Some(sub) => (sub, format!("in `{key}`: ")),
            None => return Err(jobspec::Error::input(file, format!("missing config key `{key}`"))),
        },
        None => (v, String::new()),
    };
    const KEY: &str = "max_position_embeddings";
    let offset = match v.get("model_type").and_then(|t| t.as_str()) {
        Some("roberta") => v.get("pad_token_id").and_then(|p| p.as_u64()).map_or(0, |p| p.saturating_add(1)),
        _ => 0,
    };
    match v.get(KEY).map(|x| x.as_u64().filter(|&n| n > 0)) {
        Some(Some(n)) => Ok(usize::try_from(n.saturating_sub(offset)).unwrap_or(usize::MAX)),
        Some(None) => {
            Err(jobspec::Error::input(file, format!("{within}config key `{KEY}` must be a positive integer")))
        }
        None => Err(jobspec::Error::input(file, format!("{within}missing config key `{KEY}`"))),
    }
}

/// Everything a submitted job goes through before it is stored: parse (size first), the path
/// policy, then the model's position tables. Blocking work: `admission::SpecGate` runs it.
pub fn checked_submit(r: v1::SubmitJobRequest, policy: &jobspec::policy::PathPolicy) -> Result<Submit> {
    let submit = Submit::try_from(r)?;
    check_policy(policy, &submit.0)?;
    check_model(&submit.0)?;
    Ok(submit)
}

/// A request that names one job.
pub struct JobId(pub String);

impl TryFrom<v1::GetJobRequest> for JobId {
    type Error = Error;
    fn try_from(r: v1::GetJobRequest) -> Result<Self> {
        id_field("job_id", &r.job_id).map(JobId)
    }
}

impl TryFrom<v1::WatchJobRequest> for JobId {
    type Error = Error;
    fn try_from(r: v1::WatchJobRequest) -> Result<Self> {
        id_field("job_id", &r.job_id).map(JobId)
    }
}

impl TryFrom<v1::DeleteJobRequest> for JobId {
    type Error = Error;
    fn try_from(r: v1::DeleteJobRequest) -> Result<Self> {
        id_field("job_id", &r.job_id).map(JobId)
    }
}

pub struct Cancel {
    pub job_id: String,
    pub reason: String,
}

impl TryFrom<v1::CancelJobRequest> for Cancel {
    type Error = Error;
    fn try_from(r: v1::CancelJobRequest) -> Result<Self> {
        Ok(Cancel { job_id: id_field("job_id", &r.job_id)?, reason: text_field("reason", r.reason)? })
    }
}

fn job_state(field: &str, v: i32) -> Result<JobState> {
    match v1::JobState::try_from(v) {
        Ok(v1::JobState::Pending) => Ok(JobState::Pending),
        Ok(v1::JobState::Running) => Ok(JobState::Running),
        Ok(v1::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(v1::JobState::Failed) => Ok(JobState::Failed),
        Ok(v1::JobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(v1::JobState::Unspecified) | Err(_) => Err(Error::invalid(field, format!("not a job state: {v}"))),
    }
}

/// The most jobs a List page holds, and the page size when the request gives none.
pub const MAX_PAGE_SIZE: u32 = 100;
/// A List page stops before its jobs reach this many bytes, far below gRPC's usual 4 MiB
/// message limit, however large the jobs' names, reasons or specs are.
pub const MAX_PAGE_BYTES: usize = 1 << 20;
/// A job whose spec is longer is listed without it (`spec_yaml_omitted`); Get has it whole.
pub const MAX_LISTED_SPEC: usize = 16 << 10;

/// A List request: which jobs, how many, and below which job number (the page token).
pub struct ListPage {
    /// `limit` is the page size, 1 to [`MAX_PAGE_SIZE`].
    pub filter: JobFilter,
    pub before: Option<u64>,
}

impl TryFrom<v1::ListJobsRequest> for ListPage {
    type Error = Error;
    fn try_from(r: v1::ListJobsRequest) -> Result<Self> {
        if r.states.len() > JobState::ALL.len() * 4 {
            return Err(Error::invalid("states", format!("more than {} entries", JobState::ALL.len() * 4)));
        }
        let states =
            r.states.iter().enumerate().map(|(i, &s)| job_state(&format!("states[{i}]"), s)).collect::<Result<_>>()?;
        // `limit` is the old name of page_size; 0 used to mean all, now it means one full page.
        let asked = if r.page_size > 0 { r.page_size } else { r.limit };
        let limit = if asked == 0 { MAX_PAGE_SIZE } else { asked.min(MAX_PAGE_SIZE) };
        let before = if r.page_token.is_empty() { None } else { Some(page_token(&r.page_token)?) };
        Ok(ListPage { filter: JobFilter { states, limit }, before })
    }
}

/// The token is the number of the previous page's last job; clients treat it as opaque.
fn page_token(t: &str) -> Result<u64> {
    let n = if t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()) { job_number(&format!("job-{t}")) } else { None };
    n.ok_or_else(|| Error::invalid("page_token", "not a next_page_token from a List answer"))
}

/// A List answer from one page of jobs (newest first) and whether more follow: specs over
/// [`MAX_LISTED_SPEC`] are left out, and the page ends early rather than pass
/// [`MAX_PAGE_BYTES`] (it always holds one job, when there is one).
pub fn list_response(jobs: Vec<Job>, mut more: bool) -> Result<v1::ListJobsResponse> {
    let mut out: Vec<v1::Job> = Vec::with_capacity(jobs.len());
    let mut bytes = 0;
    for job in jobs {
        let mut j = v1::Job::from(job);
        if j.spec_yaml.len() > MAX_LISTED_SPEC {
            j.spec_yaml = String::new();
            j.spec_yaml_omitted = true;
        }
        // The repeated field's tag and length prefix take at most 6 bytes more.
        let len = j.encoded_len() + 6;
        if !out.is_empty() && bytes + len > MAX_PAGE_BYTES {
            more = true;
            break;
        }
        bytes += len;
        out.push(j);
    }
    let next_page_token = match out.last() {
        Some(last) if more => job_number(&last.id)
            .ok_or_else(|| Error::Internal(format!("job id `{}` is not job-N", last.id)))?
            .to_string(),
        _ => String::new(),
    };
    Ok(v1::ListJobsResponse { jobs: out, next_page_token })
}

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => v1::JobState::Pending,
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }
}

impl From<Job> for v1::Job {
    fn from(j: Job) -> Self {
        v1::Job {
            id: j.id,
            name: j.name,
            state: v1::JobState::from(j.state) as i32,
            step: j.step,
            total_steps: j.total_steps,
            restarts: j.restarts,
            reason: j.reason,
            created_unix_ms: j.created_ms,
            updated_unix_ms: j.updated_ms,
            spec_yaml: j.spec_yaml,
            workers: j.workers,
            min_workers: j.min_workers,
            checkpoint_step: j.checkpoint_step,
            spec_yaml_omitted: false,
            goodput: j.goodput.map(Into::into),
        }
    }
}

impl From<crate::goodput::Goodput> for v1::Goodput {
    fn from(g: crate::goodput::Goodput) -> Self {
        v1::Goodput {
            ratio: g.ratio(),
            productive_s: g.productive_ms as f64 / 1e3,
            wall_s: g.wall_ms as f64 / 1e3,
            failures: g.failures,
            steps_lost: g.steps_lost,
            recovering_s: g.recovering_ms as f64 / 1e3,
        }
    }
}

impl From<Progress> for v1::Progress {
    fn from(p: Progress) -> Self {
        v1::Progress {
            step: p.step,
            total_steps: p.total_steps,
            loss: p.loss,
            lr: p.lr,
            tokens_per_s: p.tokens_per_s,
            eta_s: p.eta_s,
        }
    }
}

impl From<EvalMetrics> for v1::EvalMetrics {
    fn from(e: EvalMetrics) -> Self {
        v1::EvalMetrics {
            step: e.step,
            loss: e.loss,
            bleu: e.bleu,
            rouge1: e.rouge1,
            rouge2: e.rouge2,
            rouge_l: e.rouge_l,
            identical_share: e.identical_share,
            distinct1: e.distinct1,
            distinct2: e.distinct2,
        }
    }
}

impl From<WorkerEvent> for v1::WorkerEvent {
    fn from(w: WorkerEvent) -> Self {
        let kind = match w.kind {
            WorkerEventKind::Joined => v1::WorkerEventKind::Joined,
            WorkerEventKind::Left => v1::WorkerEventKind::Left,
            WorkerEventKind::Failed => v1::WorkerEventKind::Failed,
            WorkerEventKind::Lost => v1::WorkerEventKind::Lost,
            WorkerEventKind::Checkpoint => v1::WorkerEventKind::Checkpoint,
        };
        v1::WorkerEvent { worker_id: w.worker_id, rank: w.rank, kind: kind as i32, message: w.message }
    }
}

/// A Watch message stamped with the time it was sent.
pub fn watch_response(event: JobEvent, unix_ms: i64) -> v1::WatchJobResponse {
    use v1::watch_job_response::Event;
    let event = match event {
        JobEvent::Job(j) => Event::Job(j.into()),
        JobEvent::Progress(p) => Event::Progress(p.into()),
        JobEvent::Eval(e) => Event::Eval(e.into()),
        JobEvent::Worker(w) => Event::Worker(w.into()),
    };
    v1::WatchJobResponse { unix_ms, event: Some(event) }
}

impl TryFrom<v1::RegisterWorkerRequest> for Registration {
    type Error = Error;
    fn try_from(r: v1::RegisterWorkerRequest) -> Result<Self> {
        let caps = r.capabilities.ok_or_else(|| Error::invalid("capabilities", "must be set"))?;
        let device = device_kind(&caps)?;
        if !r.ring_address.is_empty() {
            r.ring_address.parse::<SocketAddr>().map_err(|e| {
                Error::invalid("ring_address", format!("`{}` is not an IP:PORT address ({e})", r.ring_address))
            })?;
        }
        Ok(Registration {
            hostname: text_field("hostname", r.hostname)?,
            device,
            device_index: caps.device_index,
            ring_address: r.ring_address,
            version: text_field("version", r.version)?,
        })
    }
}

/// A heartbeat: the worker and, when busy, the attempt it runs.
pub struct Heartbeat {
    pub worker_id: String,
    pub job: Option<(String, u32)>,
    pub step: u64,
    pub secret: String,
}

impl TryFrom<v1::HeartbeatRequest> for Heartbeat {
    type Error = Error;
    fn try_from(r: v1::HeartbeatRequest) -> Result<Self> {
        let job = if r.job_id.is_empty() { None } else { Some((id_field("job_id", &r.job_id)?, r.attempt)) };
        let secret = text_field("worker_secret", r.worker_secret)?;
        Ok(Heartbeat { worker_id: id_field("worker_id", &r.worker_id)?, job, step: r.step, secret })
    }
}

impl From<Command> for v1::WorkerCommand {
    fn from(c: Command) -> Self {
        match c {
            Command::Continue => v1::WorkerCommand::Continue,
            Command::Stop => v1::WorkerCommand::Stop,
            Command::Reregister => v1::WorkerCommand::Reregister,
        }
    }
}

fn attempt_ref(worker_id: &str, job_id: &str, attempt: u32) -> Result<AttemptRef> {
    Ok(AttemptRef { worker_id: id_field("worker_id", worker_id)?, job_id: id_field("job_id", job_id)?, attempt })
}

/// A GetAssignment request: who asks, and how long it may wait (capped).
pub struct AssignmentPoll {
    pub worker_id: String,
    pub wait_ms: u32,
    /// Rank 0 of an NCCL job posting its unique id.
    pub nccl_unique_id: Option<Vec<u8>>,
    pub secret: String,
    /// The training state the worker holds in memory, if any.
    pub held: Option<HeldState>,
}

/// The longest GetAssignment long-poll.
pub const MAX_WAIT_MS: u32 = 5_000;

impl TryFrom<v1::GetAssignmentRequest> for AssignmentPoll {
    type Error = Error;
    fn try_from(r: v1::GetAssignmentRequest) -> Result<Self> {
        let nccl_unique_id = match r.nccl_unique_id.len() {
            0 => None,
            crate::scheduler::NCCL_UNIQUE_ID_BYTES => Some(r.nccl_unique_id),
            n => {
                let want = crate::scheduler::NCCL_UNIQUE_ID_BYTES;
                return Err(Error::invalid("nccl_unique_id", format!("must be {want} bytes, got {n}")));
            }
        };
        Ok(AssignmentPoll {
            worker_id: id_field("worker_id", &r.worker_id)?,
            wait_ms: r.wait_ms.min(MAX_WAIT_MS),
            nccl_unique_id,
            secret: text_field("worker_secret", r.worker_secret)?,
            held: held_state("held_state", r.held_state)?,
        })
    }
}

impl From<Assignment> for v1::Assignment {
    fn from(a: Assignment) -> Self {
        v1::Assignment {
            job_id: a.job_id,
            attempt: a.attempt,
            rank: a.rank,
            world_size: a.world_size,
            job_yaml: a.job_yaml,
            nccl_unique_id: a.nccl_unique_id,
            ring_peers: a.ring_peers,
            resume_checkpoint: a.resume_checkpoint,
            resume_step: a.resume_step,
            ring_token: a.ring_token,
            resume_peer_rank: a.resume_peer_rank,
            goodput: a.goodput.map(Into::into),
        }
    }
}

impl From<v1::Progress> for Progress {
    fn from(p: v1::Progress) -> Self {
        Progress {
            step: p.step,
            total_steps: p.total_steps,
            loss: p.loss,
            lr: p.lr,
            tokens_per_s: p.tokens_per_s,
            eta_s: p.eta_s,
        }
    }
}

impl From<v1::EvalMetrics> for EvalMetrics {
    fn from(e: v1::EvalMetrics) -> Self {
        // Shares outside 0..=1 (or NaN) mean nothing: dropped rather than shown to watchers.
        let share = |x: Option<f32>| x.filter(|v| (0.0..=1.0).contains(v));
        EvalMetrics {
            step: e.step,
            loss: e.loss,
            bleu: e.bleu,
            rouge1: e.rouge1,
            rouge2: e.rouge2,
            rouge_l: e.rouge_l,
            identical_share: share(e.identical_share),
            distinct1: share(e.distinct1),
            distinct2: share(e.distinct2),
        }
    }
}

/// Progress, and the evaluation when the step ran one.
pub struct ReportProgress {
    pub at: AttemptRef,
    pub progress: Progress,
    pub eval: Option<EvalMetrics>,
    pub secret: String,
}

impl TryFrom<v1::ReportProgressRequest> for ReportProgress {
    type Error = Error;
    fn try_from(r: v1::ReportProgressRequest) -> Result<Self> {
        let p = r.progress.ok_or_else(|| Error::invalid("progress", "must be set"))?;
        Ok(ReportProgress {
            at: attempt_ref(&r.worker_id, &r.job_id, r.attempt)?,
            progress: p.into(),
            eval: r.eval.map(Into::into),
            secret: text_field("worker_secret", r.worker_secret)?,
        })
    }
}

pub struct Commit {
    pub at: AttemptRef,
    pub step: u64,
    pub path: String,
    pub manifest_sha256: String,
    pub secret: String,
}

impl TryFrom<v1::CommitCheckpointRequest> for Commit {
    type Error = Error;
    fn try_from(r: v1::CommitCheckpointRequest) -> Result<Self> {
        if r.path.is_empty() {
            return Err(Error::invalid("path", "must not be empty"));
        }
        if r.path.len() > 4096 {
            return Err(Error::invalid("path", "longer than 4096 bytes"));
        }
        Ok(Commit {
            at: attempt_ref(&r.worker_id, &r.job_id, r.attempt)?,
            step: r.step,
            path: r.path,
            manifest_sha256: text_field("manifest_sha256", r.manifest_sha256)?,
            secret: text_field("worker_secret", r.worker_secret)?,
        })
    }
}

pub struct Done {
    pub at: AttemptRef,
    pub step: u64,
    pub secret: String,
}

impl TryFrom<v1::ReportDoneRequest> for Done {
    type Error = Error;
    fn try_from(r: v1::ReportDoneRequest) -> Result<Self> {
        let secret = text_field("worker_secret", r.worker_secret)?;
        Ok(Done { at: attempt_ref(&r.worker_id, &r.job_id, r.attempt)?, step: r.step, secret })
    }
}

/// The longest job reason kept and sent to clients; worker reasons can be long error chains.
pub const MAX_REASON: usize = 2048;

/// The first [`MAX_REASON`] bytes of `reason` (on a character boundary).
pub fn cap_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// The device kind a worker registers: `device_kind`, else (an older worker) the deprecated text
/// `device`; both set must agree.
fn device_kind(caps: &v1::Capabilities) -> Result<jobspec::Device> {
    let text = || {
        jobspec::Device::parse(&caps.device)
            .ok_or_else(|| Error::invalid("capabilities.device", format!("`{}`: use cpu or cuda", caps.device)))
    };
    let kind = match v1::DeviceKind::try_from(caps.device_kind) {
        Ok(v1::DeviceKind::Unspecified) => return text(),
        Ok(v1::DeviceKind::Cpu) => jobspec::Device::Cpu,
        Ok(v1::DeviceKind::Cuda) => jobspec::Device::Cuda,
        Err(_) => {
            return Err(Error::invalid("capabilities.device_kind", format!("not a device kind: {}", caps.device_kind)));
        }
    };
    if !caps.device.is_empty() && text()? != kind {
        return Err(Error::invalid(
            "capabilities.device",
            format!("`{}` contradicts device_kind {}", caps.device, kind.as_str()),
        ));
    }
    Ok(kind)
}

/// The reason text that workers from before `ReportFailedRequest.kind` send when they leave on
/// SIGTERM; recognised only for them (kind UNSPECIFIED).
const LEGACY_SHUTDOWN_REASON: &str = "worker shutting down (SIGTERM)";

/// A worker's claim to hold a job's state in memory; an empty message (no job id) is none.
fn held_state(field: &str, h: Option<v1::HeldState>) -> Result<Option<HeldState>> {
    match h {
        Some(h) if !h.job_id.is_empty() => {
            Ok(Some(HeldState { job_id: id_field(&format!("{field}.job_id"), &h.job_id)?, step: h.step }))
        }
        _ => Ok(None),
    }
}

pub struct Failed {
    pub at: AttemptRef,
    /// The training state the worker kept from the attempt, if any.
    pub held: Option<HeldState>,
    /// Steps the worker had completed.
    pub step: u64,
    /// At most [`MAX_REASON`] bytes.
    pub reason: String,
    /// What the scheduler does next: retry, fail the job, or drop the worker.
    pub kind: FailureKind,
    pub secret: String,
}

/// `kind`, else (an older worker) `input_error` and the legacy shutdown reason. A set kind must
/// agree with `input_error`, which new workers still send for older coordinators.
fn failure_kind(r: &v1::ReportFailedRequest) -> Result<FailureKind> {
    let kind = match v1::FailureKind::try_from(r.kind) {
        Ok(v1::FailureKind::Unspecified) if r.input_error => return Ok(FailureKind::InputError),
        Ok(v1::FailureKind::Unspecified) if r.reason == LEGACY_SHUTDOWN_REASON => {
            return Ok(FailureKind::WorkerShutdown);
        }
        Ok(v1::FailureKind::Unspecified) => return Ok(FailureKind::Error),
        Ok(v1::FailureKind::Error) => FailureKind::Error,
        Ok(v1::FailureKind::InputError) => FailureKind::InputError,
        Ok(v1::FailureKind::WorkerShutdown) => FailureKind::WorkerShutdown,
        Err(_) => return Err(Error::invalid("kind", format!("not a failure kind: {}", r.kind))),
    };
    if r.input_error != (kind == FailureKind::InputError) {
        return Err(Error::invalid("input_error", format!("{} contradicts kind {kind:?}", r.input_error)));
    }
    Ok(kind)
}

pub struct Deregister {
    pub worker_id: String,
    pub reason: String,
    pub secret: String,
}

impl TryFrom<v1::DeregisterRequest> for Deregister {
    type Error = Error;
    fn try_from(r: v1::DeregisterRequest) -> Result<Self> {
        Ok(Deregister {
            worker_id: id_field("worker_id", &r.worker_id)?,
            reason: text_field("reason", r.reason)?,
            secret: text_field("worker_secret", r.worker_secret)?,
        })
    }
}

impl TryFrom<v1::ReportFailedRequest> for Failed {
    type Error = Error;
    fn try_from(r: v1::ReportFailedRequest) -> Result<Self> {
        Ok(Failed {
            at: attempt_ref(&r.worker_id, &r.job_id, r.attempt)?,
            kind: failure_kind(&r)?,
            held: held_state("held_state", r.held_state.clone())?,
            step: r.step,
            reason: cap_reason(r.reason),
            secret: text_field("worker_secret", r.worker_secret)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let e = Submit::try_from(v1::SubmitJobRequest { job_yaml: "name: x\nbogus: 1\n".into() }).err().unwrap();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.starts_with("job_yaml: ") && m.contains("bogus")), "{e}");
        let e = JobId::try_from(v1::GetJobRequest { job_id: " ".into() }).err().unwrap();
        assert_eq!(e.to_string(), "job_id: must not be empty");
        let e = ListPage::try_from(v1::ListJobsRequest { states: vec![1, 42], ..Default::default() }).err().unwrap();
        assert!(e.to_string().starts_with("states[1]: "), "{e}");
        let caps = v1::Capabilities { device: "tpu".into(), ..Default::default() };
        let e = Registration::try_from(v1::RegisterWorkerRequest { capabilities: Some(caps), ..Default::default() });
        assert!(e.err().unwrap().to_string().starts_with("capabilities.device: "));
    }

    fn registered(device: &str, device_kind: i32) -> Result<jobspec::Device> {
        let caps = v1::Capabilities { device: device.into(), device_kind, ..Default::default() };
        let r = v1::RegisterWorkerRequest { capabilities: Some(caps), hostname: "h".into(), ..Default::default() };
        Registration::try_from(r).map(|r| r.device)
    }

    #[test]
    fn device_kind_is_read_from_the_enum_else_the_old_text() {
        use jobspec::Device::{Cpu, Cuda};
        let (cpu, cuda) = (v1::DeviceKind::Cpu as i32, v1::DeviceKind::Cuda as i32);
        assert_eq!(registered("", cuda).unwrap(), Cuda);
        assert_eq!(registered("cuda", cuda).unwrap(), Cuda);
        assert_eq!(registered("", cpu).unwrap(), Cpu);
        // An older worker: the text alone.
        assert_eq!(registered("cuda", 0).unwrap(), Cuda);
        assert_eq!(registered("cpu", 0).unwrap(), Cpu);
        let e = registered("", 0).unwrap_err().to_string();
        assert!(e.starts_with("capabilities.device: "), "{e}");
        let e = registered("cpu", cuda).unwrap_err().to_string();
        assert!(e.starts_with("capabilities.device: ") && e.contains("contradicts"), "{e}");
        let e = registered("", 7).unwrap_err().to_string();
        assert_eq!(e, "capabilities.device_kind: not a device kind: 7");
    }

    fn failed(reason: &str, input_error: bool, kind: v1::FailureKind) -> Result<FailureKind> {
        let r = v1::ReportFailedRequest {
            worker_id: "w".into(),
            job_id: "job-1".into(),
            attempt: 1,
            reason: reason.into(),
            worker_secret: "s".into(),
            input_error,
            kind: kind as i32,
            ..Default::default()
        };
        Failed::try_from(r).map(|f| f.kind)
    }

    #[test]
    fn failure_kind_is_typed_and_old_workers_still_mean_the_same() {
        use v1::FailureKind as P;
        assert_eq!(failed("boom", false, P::Error).unwrap(), FailureKind::Error);
        assert_eq!(failed("bad path", true, P::InputError).unwrap(), FailureKind::InputError);
        // The reason text means nothing once the kind is set.
        assert_eq!(failed(LEGACY_SHUTDOWN_REASON, false, P::Error).unwrap(), FailureKind::Error);
        assert_eq!(failed("leaving", false, P::WorkerShutdown).unwrap(), FailureKind::WorkerShutdown);
        // Older workers: input_error and the shutdown text.
        assert_eq!(failed("boom", false, P::Unspecified).unwrap(), FailureKind::Error);
        assert_eq!(failed("bad path", true, P::Unspecified).unwrap(), FailureKind::InputError);
        assert_eq!(failed(LEGACY_SHUTDOWN_REASON, false, P::Unspecified).unwrap(), FailureKind::WorkerShutdown);
        let e = failed("x", true, P::Error).unwrap_err().to_string();
        assert!(e.starts_with("input_error: "), "{e}");
        let e = failed("x", false, P::InputError).unwrap_err().to_string();
        assert!(e.starts_with("input_error: "), "{e}");
        let mut r = v1::ReportFailedRequest { worker_id: "w".into(), job_id: "job-1".into(), ..Default::default() };
        (r.attempt, r.worker_secret, r.kind) = (1, "s".into(), 9);
        assert_eq!(Failed::try_from(r).err().unwrap().to_string(), "kind: not a failure kind: 9");
    }
}
