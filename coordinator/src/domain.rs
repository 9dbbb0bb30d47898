//! Domain types: jobs, their states and events, workers, and a clock. No protobuf in here.

use std::sync::atomic::{AtomicI64, Ordering};

/// The life of a job: `Pending -> Running -> Succeeded | Failed`, `Cancelled` from either of the
/// first two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Pending, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    /// The name stored in the database and printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No more changes after this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: String,
    pub name: String,
    /// `JobSpec::to_yaml` of the submitted job: every default written out, absolute paths.
    pub spec_yaml: String,
    pub state: JobState,
    pub step: u64,
    pub total_steps: u64,
    pub restarts: u32,
    pub reason: String,
    pub workers: u32,
    pub min_workers: u32,
    /// What the scheduler needs of the spec besides the gang size, parsed once at submit and
    /// stored as columns, so that scheduling never parses `spec_yaml`.
    pub placement: Placement,
    /// The newest committed checkpoint's step, 0 when none (derived from the checkpoints table).
    pub checkpoint_step: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Soft state, not stored: `None` until an attempt has started since the coordinator did.
    pub goodput: Option<crate::goodput::Goodput>,
}

/// A job to create: the store assigns the id.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub name: String,
    pub spec_yaml: String,
    pub total_steps: u64,
    pub workers: u32,
    pub min_workers: u32,
    pub placement: Placement,
    pub created_ms: i64,
}

/// The fields of a job's spec that scheduling reads (`resources.device`,
/// `resources.max_restarts`, `checkpoint.dir`), typed.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub device: jobspec::Device,
    pub max_restarts: u32,
    /// `checkpoint.dir` as the spec has it (absolute after `JobSpec::to_yaml`).
    pub checkpoint_dir: String,
}

/// Which jobs to list.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Empty: every state.
    pub states: Vec<JobState>,
    /// 0: no limit.
    pub limit: u32,
}

/// The number N of a job id `job-N`. Stores assign N in submission order and never reuse it,
/// so it is the key that List pages by (newest first: a page continues below the last N seen).
pub fn job_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("job-")?;
    // Only canonical decimals (no sign, no leading zero), so that each number has one id.
    if digits.is_empty() || digits.len() > 19 || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    digits.parse().ok()
}

/// One attempt of a job: a gang of workers with ranks 0..world_size.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub job_id: String,
    pub attempt: u32,
    pub world_size: u32,
    /// Worker ids by rank.
    pub workers: Vec<String>,
    pub resume_step: u64,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// Why it ended; empty while it runs.
    pub outcome: String,
}

/// A checkpoint that rank 0 wrote and the coordinator committed.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub job_id: String,
    pub step: u64,
    pub path: String,
    pub manifest_sha256: String,
    pub committed_ms: i64,
}

/// Training progress as rank 0 reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f32,
    pub lr: f32,
    pub tokens_per_s: f64,
    pub eta_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalMetrics {
    pub step: u64,
    pub loss: f32,
    pub bleu: Option<f32>,
    pub rouge1: Option<f32>,
    pub rouge2: Option<f32>,
    pub rouge_l: Option<f32>,
    pub identical_share: Option<f32>,
    pub distinct1: Option<f32>,
    pub distinct2: Option<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerEventKind {
    Joined,
    Left,
    Failed,
    Lost,
    Checkpoint,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEvent {
    pub worker_id: String,
    pub rank: u32,
    pub kind: WorkerEventKind,
    pub message: String,
}

/// What `Watch` streams.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    /// The job after a change of state.
    Job(Job),
    Progress(Progress),
    Eval(EvalMetrics),
    Worker(WorkerEvent),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    Alive,
    /// Missed its heartbeats past the timeout (or failed); it must register again.
    Dead,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Alive => "ALIVE",
            WorkerState::Dead => "DEAD",
        }
    }
    pub fn parse(s: &str) -> Option<WorkerState> {
        [WorkerState::Alive, WorkerState::Dead].into_iter().find(|w| w.as_str() == s)
    }
}

/// Why an attempt failed on a worker (`ReportFailed`), which decides what happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The attempt failed on this worker (a crash, a lost peer, a STOP): run the job again.
    Error,
    /// The job itself is at fault (a bad path or data file, a path outside the worker's roots):
    /// another attempt would fail the same way, so the job fails at once.
    InputError,
    /// The worker is leaving for good (SIGTERM): re-form the gang without it.
    WorkerShutdown,
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Worker {
    pub id: String,
    pub hostname: String,
    /// The device kind it trains on: a job's `resources.device` must match it.
    pub device: jobspec::Device,
    pub device_index: u32,
    pub ring_address: String,
    pub version: String,
    pub state: WorkerState,
    pub registered_ms: i64,
    pub last_seen_ms: i64,
}

/// Milliseconds since the Unix epoch; a trait so tests can move time by hand.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

/// A clock that only moves when told to.
#[derive(Default)]
pub struct FakeClock(AtomicI64);

impl FakeClock {
    pub fn new(ms: i64) -> Self {
        FakeClock(AtomicI64::new(ms))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
