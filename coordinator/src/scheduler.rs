//! Gang scheduling: a PENDING job whose `workers` idle live workers exist becomes an attempt
//! (ranks 0..N by registration order, ring peers, a ring token, the checkpoint to resume from).
//! Progress, checkpoint commits and outcomes of the attempt come back through here; a failed
//! or lost member ends the attempt and the job is queued again up to `max_restarts`.
//!
//! Elastic gangs: a job that has waited `elastic_wait` in PENDING starts with fewer than
//! `workers` (but at least `min_workers`) when that is all there is, so a job whose worker died
//! for good re-forms on the survivors. Any world size up to `workers` keeps the update exact:
//! the micro-batch size comes from the job (`workers`, not the gang), the trainer deals the
//! global batch's micro-batches round-robin over the ranks, and each rank's gradient is scaled by
//! world / label tokens before the average over ranks, which leaves sum / label tokens whatever
//! the world size. `validate` makes the micro-batch count a multiple of `workers`, so every rank
//! of a smaller gang gets at least one micro-batch (just not always the same number).
//!
//! Scaling back up: when rank 0 of a gang smaller than `workers` commits a checkpoint while
//! idle workers of its device wait and no other job is pending, the attempt ends there ("scaling
//! up", not counted as a restart) and the job re-forms at once, larger, from that checkpoint.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::convert::cap_reason;
use crate::domain::{
    Attempt, Checkpoint, Clock, EvalMetrics, FailureKind, JobEvent, JobFilter, JobState, Placement, Progress, Worker,
    WorkerEvent, WorkerEventKind,
};
use crate::error::{Error, Result};
use crate::jobs::{Jobs, Queued};
use crate::store::Store;
use crate::workers::{Command, Workers};

/// One rank's part of an attempt, as GetAssignment hands it out.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub world_size: u32,
    pub job_yaml: String,
    pub ring_peers: Vec<String>,
    pub ring_token: u64,
    pub resume_checkpoint: String,
    pub resume_step: u64,
    /// The job trains on CUDA: its ranks meet through an NCCL communicator, not the CPU ring.
    pub uses_nccl: bool,
    /// NCCL jobs: rank 0's unique id, empty until rank 0 has posted it ([`Scheduler::post_nccl_id`]).
    pub nccl_unique_id: Vec<u8>,
    /// Resume from the state this rank holds in memory (at `resume_step`), handed to the other
    /// ranks over the collective, rather than from `resume_checkpoint`.
    pub resume_peer_rank: Option<u32>,
    /// The job's goodput when the attempt started.
    pub goodput: Option<crate::goodput::Goodput>,
}

/// A worker's claim to hold a job's training state in memory after `step` steps (recovery from
/// peers): kept from its ReportFailed or GetAssignment until it joins a gang.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldState {
    pub job_id: String,
    pub step: u64,
}

/// A running attempt.
struct Gang {
    attempt: Attempt,
    job_yaml: String,
    placement: Placement,
    ring_peers: Vec<String>,
    ring_token: u64,
    resume: Option<Checkpoint>,
    /// The rank whose in-memory state the attempt resumes from, if any.
    peer_rank: Option<u32>,
    goodput: Option<crate::goodput::Goodput>,
    nccl: NcclRelay,
}

#[derive(Default)]
struct Table {
    /// By job id.
    gangs: HashMap<String, Gang>,
    /// Worker id -> the job it runs.
    busy: HashMap<String, String>,
    /// Workers that said they are shutting down: never scheduled again, even in the moment
    /// between that report and their Deregister call.
    departed: HashSet<String>,
    /// Worker id -> when it last called about work (asked for an assignment, reported progress
    /// or an outcome); i64::MIN when it has not since its last attempt ended. Only workers heard
    /// from lately join a new gang: a worker killed a moment ago still counts as alive until its
    /// heartbeats time out, and a gang with it would wait for it until the ring's connect
    /// timeout.
    last_heard: HashMap<String, i64>,
    /// Job id -> the gang size it stopped to grow to: it starts as soon as that many are idle,
    /// without the elastic wait.
    grow_to: HashMap<String, usize>,
    /// `Jobs::ended_generation` at the last sweep, plus one (0: never swept). Every worker RPC
    /// sweeps; checking each gang's job in the store each time cost O(gangs) store reads per
    /// RPC, which saturated the coordinator at 1000 workers (cli/examples/coordinator_load).
    swept: u64,
    /// Worker id -> how many of its GetAssignment calls are waiting now ([`Scheduler::wait_for_assignment`]):
    /// a worker in such a call is alive and idle however long ago it was last heard from.
    waiting: HashMap<String, usize>,
    /// Worker id -> the training state it says it holds in memory (checked: it was a member of
    /// an attempt of that job). Cleared when the worker joins a gang.
    held: HashMap<String, HeldState>,
}

/// How recently an idle worker must have called (or registered) to join a gang, unless it is
/// waiting in GetAssignment right now. Idle agents long-poll GetAssignment back to back, and a
/// wait that ends marks the worker heard from, so a live idle worker is never staler than this.
const POLL_FRESH_MS: i64 = 1_000;

/// How long a PENDING job waits for its full gang before starting with fewer workers.
pub const DEFAULT_ELASTIC_WAIT: Duration = Duration::from_secs(10);

pub struct Scheduler {
    jobs: Arc<Jobs>,
    workers: Arc<Workers>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    table: Mutex<Table>,
    elastic_wait_ms: i64,
    /// Wakes waiting GetAssignment calls: signalled when a gang starts or ends, when rank 0
    /// posts an NCCL id and when a job joins the PENDING queue.
    changed: Arc<Notify>,
}

/// Which attempt a worker call is about.
#[derive(Clone, Debug)]
pub struct AttemptRef {
    pub worker_id: String,
    pub job_id: String,
    pub attempt: u32,
}

impl Scheduler {
    /// Jobs that were RUNNING when the coordinator stopped have lost their gang: queue them
    /// again (without counting a restart).
    pub fn new(jobs: Arc<Jobs>, workers: Arc<Workers>, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Self> {
        let running = jobs.list(&JobFilter { states: vec![JobState::Running], limit: 0 })?;
        for j in running {
            jobs.transition(&j.id, |job| {
                job.state = JobState::Pending;
                job.reason = "coordinator restarted; waiting for workers".into();
                Ok(())
            })?;
        }
        let elastic_wait_ms = DEFAULT_ELASTIC_WAIT.as_millis() as i64;
        let changed = Arc::new(Notify::new());
        let wake = changed.clone();
        jobs.on_queue_change(move || wake.notify_waiters())?;
        let table = Mutex::new(Table::default());
        Ok(Scheduler { jobs, workers, store, clock, table, elastic_wait_ms, changed })
    }

    /// How long a PENDING job waits for `workers` idle workers before it starts with at least
    /// `min_workers` (see the module comment).
    pub fn with_elastic_wait(mut self, wait: Duration) -> Self {
        self.elastic_wait_ms = wait.as_millis().min(i64::MAX as u128) as i64;
        self
    }

    fn table(&self) -> Result<MutexGuard<'_, Table>> {
        self.table.lock().map_err(|_| Error::Internal("scheduler lock poisoned".into()))
    }

    /// The worker's assignment: the one it already has, or a new gang it is part of, or `None`.
    pub fn assignment(&self, worker_id: &str) -> Result<Option<Assignment>> {
        Ok(self.look(worker_id)?.0)
    }

    /// [`Self::assignment`], and when there is none, the clock time at which the elastic wait
    /// of a job the worker could start smaller runs out (see `schedule`).
    fn look(&self, worker_id: &str) -> Result<(Option<Assignment>, Option<i64>)> {
        let mut t = self.table()?;
        self.sweep(&mut t)?;
        if t.departed.contains(worker_id) {
            return Ok((None, None));
        }
        self.heard(&mut t, worker_id);
        let mut due = None;
        if !t.busy.contains_key(worker_id) {
            due = self.schedule(&mut t, worker_id)?;
        }
        Ok((Self::assigned(&t, worker_id), due))
    }

    fn assigned(t: &Table, worker_id: &str) -> Option<Assignment> {
        let job_id = t.busy.get(worker_id)?;
        let g = t.gangs.get(job_id)?;
        let rank = g.attempt.workers.iter().position(|w| w == worker_id)?;
        Some(Assignment {
            job_id: g.attempt.job_id.clone(),
            attempt: g.attempt.attempt,
            rank: rank as u32,
            world_size: g.attempt.world_size,
            job_yaml: g.job_yaml.clone(),
            ring_peers: g.ring_peers.clone(),
            ring_token: g.ring_token,
            resume_checkpoint: g.resume.as_ref().map(|c| c.path.clone()).unwrap_or_default(),
            resume_step: g.attempt.resume_step,
            uses_nccl: !matches!(g.nccl, NcclRelay::NotNeeded),
            nccl_unique_id: g.nccl.id().to_vec(),
            resume_peer_rank: g.peer_rank,
            goodput: g.goodput,
        })
    }

    /// Drops gangs whose job ended (e.g. was cancelled).
    fn sweep(&self, t: &mut Table) -> Result<()> {
        // Read before scanning: a job that ends during the scan bumps it again.
        let generation = self.jobs.ended_generation() + 1;
        if t.swept == generation {
            return Ok(()); // no job has ended since the last sweep
        }
        let mut ended = Vec::new();
        for id in t.gangs.keys() {
            if self.jobs.get(id)?.state.is_terminal() {
                ended.push(id.clone());
            }
        }
        for id in ended {
            self.end(t, &id, "job ended", false)?;
        }
        let mut stale = Vec::new();
        for id in t.grow_to.keys() {
            if self.jobs.get(id)?.state.is_terminal() {
                stale.push(id.clone());
            }
        }
        for id in stale {
            t.grow_to.remove(&id);
        }
        t.swept = generation;
        Ok(())
    }

    /// Starts the oldest PENDING job that fits the idle workers, if the caller is idle and alive:
    /// with `workers` of them, or after `elastic_wait` with at least `min_workers`. Reads the
    /// queue from memory: no store read, no YAML. When nothing starts, returns the earliest
    /// clock time at which a job's elastic wait runs out with enough idle workers to start it
    /// smaller: a change no event announces, which a waiting caller must wake for.
    fn schedule(&self, t: &mut Table, caller: &str) -> Result<Option<i64>> {
        let mut elastic_due: Option<i64> = None;
        let Some(me) = self.workers.live_worker(caller)? else { return Ok(None) };
        let now = self.clock.now_ms();
        // The other idle workers, listed only for a job that needs more than the caller: the
        // list copies and sorts every live worker (about 1 ms at 1000), under the table lock,
        // on every poll (BENCHMARKS.md, "Coordinator under load").
        let mut idle: Option<Vec<Worker>> = None;
        for job in self.jobs.pending()? {
            let need = job.workers.max(1) as usize;
            let least = (job.min_workers as usize).clamp(1, need);
            if me.device != job.device {
                continue;
            }
            if need > 1 && idle.is_none() {
                let alive = self.workers.alive()?;
                idle = Some(self.ready(t, &alive).into_iter().filter(|w| w.id != caller).cloned().collect());
            }
            // Workers holding the job's newest state in memory first, so the gang resumes from it.
            let mut others: Vec<&Worker> = idle.iter().flatten().filter(|w| w.device == job.device).collect();
            others.sort_by_key(|w| std::cmp::Reverse(held_step(t, &w.id, &job.id).map_or(0, |s| s + 1)));
            others.truncate(need - 1);
            let due = job.since_ms.saturating_add(self.elastic_wait_ms);
            let waited = now >= due;
            let grown = t.grow_to.get(&job.id).is_some_and(|&n| others.len() + 1 >= n.min(need));
            if others.len() + 1 < need && !grown && !(waited && others.len() + 1 >= least) {
                if others.len() + 1 >= least {
                    elastic_due = Some(elastic_due.map_or(due, |d| d.min(due)));
                }
                continue;
            }
            let mut gang: Vec<Worker> = others.into_iter().cloned().collect();
            gang.push(me);
            gang.sort_by(|a, b| (a.registered_ms, &a.id).cmp(&(b.registered_ms, &b.id)));
            self.start(t, &job, gang)?;
            return Ok(None);
        }
        Ok(elastic_due)
    }

    /// Idle live workers that may join a gang: not departed, and heard from lately.
    fn ready<'a>(&self, t: &Table, alive: &'a [Worker]) -> Vec<&'a Worker> {
        let now = self.clock.now_ms();
        let fresh = |w: &Worker| {
            t.waiting.contains_key(&w.id)
                || t.last_heard.get(&w.id).copied().unwrap_or(w.registered_ms) >= now - POLL_FRESH_MS
        };
        alive.iter().filter(|w| !t.busy.contains_key(&w.id) && !t.departed.contains(&w.id) && fresh(w)).collect()
    }

    /// After a commit by rank 0: if the gang is smaller than the job wants, idle workers of its
    /// device wait and no other job is pending (those come first), end the attempt so the job
    /// re-forms larger from the checkpoint just committed. Returns whether it did.
    fn grow(&self, t: &mut Table, job_id: &str, step: u64) -> Result<bool> {
        let Some(g) = t.gangs.get(job_id) else { return Ok(false) };
        let job = self.jobs.get(job_id)?;
        let world = g.attempt.world_size as usize;
        let want = job.workers.max(1) as usize;
        if world >= want || self.jobs.has_pending()? {
            return Ok(false);
        }
        let alive = self.workers.alive()?;
        let device = alive.iter().find(|w| w.id == g.attempt.workers[0]).map(|w| w.device);
        let extra = self.ready(t, &alive).into_iter().filter(|w| Some(w.device) == device).count();
        if extra == 0 {
            return Ok(false);
        }
        let target = (world + extra).min(want);
        let why = format!("scaling up from {world} to {target} workers at step {step}");
        tracing::info!(job = %job_id, "{why}");
        self.end(t, job_id, &why, false)?;
        t.grow_to.insert(job_id.to_owned(), target);
        self.jobs.transition(job_id, |j| {
            j.state = JobState::Pending;
            j.reason = why.clone();
            Ok(())
        })?;
        Ok(true)
    }

    fn start(&self, t: &mut Table, queued: &Queued, gang: Vec<Worker>) -> Result<()> {
        // One store read per attempt, for the YAML the workers get; nothing here parses it.
        let job = self.jobs.get(&queued.id)?;
        if job.state != JobState::Pending {
            return Ok(()); // cancelled since the queue was read
        }
        t.grow_to.remove(&job.id);
        let number = self.store.attempts(&job.id)?.iter().map(|a| a.attempt).max().unwrap_or(0) + 1;
        let resume = self.store.latest_checkpoint(&job.id)?;
        let checkpoint_step = resume.as_ref().map_or(0, |c| c.step);
        // The newest state a member holds, if newer than the checkpoint. A state at the last
        // step is not used: its attempt may have ended before writing the final checkpoint.
        let peer = gang
            .iter()
            .enumerate()
            .filter_map(|(rank, w)| held_step(t, &w.id, &job.id).map(|step| (step, std::cmp::Reverse(rank))))
            .filter(|&(step, _)| step > checkpoint_step && step < job.total_steps)
            .max()
            .map(|(step, std::cmp::Reverse(rank))| (rank as u32, step));
        for w in &gang {
            t.held.remove(&w.id);
        }
        let attempt = Attempt {
            job_id: job.id.clone(),
            attempt: number,
            world_size: gang.len() as u32,
            workers: gang.iter().map(|w| w.id.clone()).collect(),
            resume_step: peer.map_or(checkpoint_step, |p| p.1),
            started_ms: self.clock.now_ms(),
            ended_ms: None,
            outcome: String::new(),
        };
        // One transaction (one fsync) for the attempt and the job's RUNNING state: this runs
        // under the table lock, which every worker RPC takes (cli/examples/coordinator_load).
        self.jobs.start_attempt(&job.id, &attempt, |j| {
            j.state = JobState::Running;
            j.reason = String::new();
            Ok(())
        })?;
        match peer {
            Some((rank, step)) => {
                tracing::info!(job = %job.id, attempt = number, world = gang.len(), step, rank, "attempt started from a peer's state")
            }
            None => {
                tracing::info!(job = %job.id, attempt = number, world = gang.len(), step = checkpoint_step, "attempt started")
            }
        }
        for (rank, w) in gang.iter().enumerate() {
            t.busy.insert(w.id.clone(), job.id.clone());
            let from = match peer {
                Some((p, step)) => format!("from step {step} held in memory by rank {p}"),
                None if checkpoint_step > 0 => format!("from checkpoint step {checkpoint_step}"),
                None => "from the start".to_owned(),
            };
            let what = format!("attempt {number}: rank {rank} of {}, {from}", gang.len());
            self.worker_event(&job.id, &w.id, rank, WorkerEventKind::Joined, what);
        }
        let gang = Gang {
            attempt,
            nccl: NcclRelay::for_device(job.placement.device),
            job_yaml: job.spec_yaml,
            placement: job.placement,
            ring_peers: gang.iter().map(|w| w.ring_address.clone()).collect(),
            ring_token: ring_token()?,
            resume,
            peer_rank: peer.map(|p| p.0),
            goodput: self.jobs.goodput(&job.id),
        };
        t.gangs.insert(job.id, gang);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Ends the job's attempt with `outcome` and frees its workers. `failed`: a failure ended
    /// it (for goodput; not a cancel, a success or a scale-up).
    fn end(&self, t: &mut Table, job_id: &str, outcome: &str, failed: bool) -> Result<()> {
        if let Some(mut g) = t.gangs.remove(job_id) {
            self.jobs.attempt_ended(job_id, failed);
            for w in &g.attempt.workers {
                t.busy.remove(w);
                // A member may have died with the attempt: it joins a new gang only once it
                // asks for work again.
                t.last_heard.insert(w.clone(), i64::MIN);
            }
            g.attempt.ended_ms = Some(self.clock.now_ms());
            g.attempt.outcome = outcome.to_owned();
            self.store.put_attempt(&g.attempt)?;
            self.changed.notify_waiters();
        }
        Ok(())
    }

    /// Tells the job's watchers what happened to one member of its gang.
    fn worker_event(&self, job_id: &str, worker_id: &str, rank: usize, kind: WorkerEventKind, message: String) {
        let e = WorkerEvent { worker_id: worker_id.to_owned(), rank: rank as u32, kind, message };
        self.jobs.publish(job_id, JobEvent::Worker(e));
    }

    fn heard(&self, t: &mut Table, worker_id: &str) {
        t.last_heard.insert(worker_id.to_owned(), self.clock.now_ms());
    }

    /// The caller's rank if `r` names the current attempt of the job.
    fn rank(t: &Table, r: &AttemptRef) -> Option<usize> {
        let g = t.gangs.get(&r.job_id)?;
        if g.attempt.attempt != r.attempt {
            return None;
        }
        g.attempt.workers.iter().position(|w| *w == r.worker_id)
    }

    /// The caller's rank if `r` names the current attempt of the job; `None` if it names an
    /// attempt the caller was in that has ended (a late report, which changes nothing).
    /// PERMISSION_DENIED if the caller never was a member of that attempt: one worker may not
    /// report for another's job.
    fn member(&self, t: &Table, r: &AttemptRef) -> Result<Option<usize>> {
        if let Some(rank) = Self::rank(t, r) {
            return Ok(Some(rank));
        }
        let attempts = self.store.attempts(&r.job_id)?;
        if attempts.iter().any(|a| a.attempt == r.attempt && a.workers.contains(&r.worker_id)) {
            return Ok(None);
        }
        Err(Error::PermissionDenied(format!(
            "worker `{}` is not a member of attempt {} of job `{}`",
            r.worker_id, r.attempt, r.job_id
        )))
    }

    /// What a worker in attempt `r` should do: go on while the attempt is current.
    pub fn command(&self, r: &AttemptRef) -> Result<Command> {
        let mut t = self.table()?;
        self.sweep(&mut t)?;
        self.heard(&mut t, &r.worker_id);
        Ok(if Self::rank(&t, r).is_some() { Command::Continue } else { Command::Stop })
    }

    /// Rank 0's progress updates the job's step; every rank learns whether to go on.
    pub fn progress(&self, r: &AttemptRef, p: Progress) -> Result<Command> {
        let rank = {
            let mut t = self.table()?;
            self.sweep(&mut t)?;
            let rank = self.member(&t, r)?;
            self.heard(&mut t, &r.worker_id);
            rank
        };
        match rank {
            None => Ok(Command::Stop),
            Some(0) => {
                self.jobs.set_step(&r.job_id, p.step)?;
                self.jobs.publish(&r.job_id, JobEvent::Progress(p));
                Ok(Command::Continue)
            }
            Some(_) => Ok(Command::Continue),
        }
    }

    /// Rank 0's evaluation results go to the job's watchers; other ranks' are ignored.
    pub fn eval(&self, r: &AttemptRef, e: EvalMetrics) -> Result<()> {
        if self.member(&*self.table()?, r)? == Some(0) {
            self.jobs.publish(&r.job_id, JobEvent::Eval(e));
        }
        Ok(())
    }

    /// Rank 0 commits `path`, which must be `<checkpoint.dir>/step-<step>` of the job (compared
    /// lexically: the coordinator need not see the workers' filesystem), so that a restart
    /// never resumes from anywhere else.
    pub fn commit_checkpoint(&self, r: &AttemptRef, step: u64, path: String, sha: String) -> Result<Command> {
        let mut t = self.table()?;
        if self.member(&t, r)? != Some(0) {
            return Err(Error::FailedPrecondition(format!(
                "job_id: worker `{}` is not rank 0 of attempt {} of `{}`",
                r.worker_id, r.attempt, r.job_id
            )));
        }
        if let Some(g) = t.gangs.get(&r.job_id) {
            checkpoint_path(&g.placement.checkpoint_dir, step, &path)?;
        }
        let c = Checkpoint {
            job_id: r.job_id.clone(),
            step,
            path,
            manifest_sha256: sha,
            committed_ms: self.clock.now_ms(),
        };
        self.store.insert_checkpoint(&c)?;
        tracing::info!(job = %r.job_id, step, path = %c.path, "checkpoint committed");
        self.worker_event(&r.job_id, &r.worker_id, 0, WorkerEventKind::Checkpoint, format!("step {step}"));
        Ok(if self.grow(&mut t, &r.job_id, step)? { Command::Stop } else { Command::Continue })
    }

    /// Rank 0 done with every step: the job SUCCEEDED. Other ranks just leave the gang.
    pub fn done(&self, r: &AttemptRef, step: u64) -> Result<()> {
        let mut t = self.table()?;
        match self.member(&t, r)? {
            Some(0) => {
                let job = self.jobs.get(&r.job_id)?;
                if step < job.total_steps {
                    drop(t);
                    let why = format!("rank 0 stopped at step {step} of {}", job.total_steps);
                    return self.failed(r, &why, FailureKind::Error);
                }
                self.end(&mut t, &r.job_id, "succeeded", false)?;
                self.worker_event(&r.job_id, &r.worker_id, 0, WorkerEventKind::Left, format!("done at step {step}"));
                self.jobs.transition(&r.job_id, |j| {
                    j.state = JobState::Succeeded;
                    j.step = step;
                    j.reason = String::new();
                    Ok(())
                })?;
            }
            Some(rank) => {
                t.busy.remove(&r.worker_id);
                self.worker_event(&r.job_id, &r.worker_id, rank, WorkerEventKind::Left, format!("done at step {step}"));
            }
            // A stale attempt: nothing to do.
            None => {}
        }
        self.heard(&mut t, &r.worker_id);
        Ok(())
    }

    /// A member failed: end the attempt; queue the job again, or fail it after max_restarts.
    /// `kind` InputError: the job itself is at fault (a bad path or data file, a path outside the
    /// worker's roots), so another attempt would fail the same way: fail the job at once.
    /// WorkerShutdown: the worker is leaving, so it joins no new gang.
    pub fn failed(&self, r: &AttemptRef, reason: &str, kind: FailureKind) -> Result<()> {
        self.failed_at(r, reason, kind, 0)
    }

    /// [`Self::failed`] by a worker that had completed `step` steps: the steps the attempt
    /// reached, for goodput's steps lost (rank 0's throttled progress may lag behind).
    pub fn failed_at(&self, r: &AttemptRef, reason: &str, kind: FailureKind, step: u64) -> Result<()> {
        let mut t = self.table()?;
        let member = self.member(&t, r)?;
        if member.is_some() {
            self.jobs.attempt_reached(&r.job_id, step);
        }
        if kind == FailureKind::WorkerShutdown {
            t.departed.insert(r.worker_id.clone());
        }
        let Some(rank) = member else {
            self.heard(&mut t, &r.worker_id);
            return Ok(());
        };
        let why = format!("rank {rank} ({}) failed: {reason}", r.worker_id);
        self.worker_event(&r.job_id, &r.worker_id, rank, WorkerEventKind::Failed, reason.to_owned());
        self.end(&mut t, &r.job_id, &why, true)?;
        // The reporter is alive, unlike (perhaps) the rest of its gang.
        self.heard(&mut t, &r.worker_id);
        if kind == FailureKind::InputError {
            self.jobs.transition(&r.job_id, |j| {
                j.state = JobState::Failed;
                j.reason = cap_reason(why.clone());
                Ok(())
            })?;
            return Ok(());
        }
        self.requeue(&r.job_id, &why)
    }

    /// Workers lost to the heartbeat timeout end the attempts they were in.
    pub fn lost(&self, dead: &[Worker]) -> Result<()> {
        for w in dead {
            self.drop_worker(w, WorkerEventKind::Lost, "no heartbeat")?;
        }
        Ok(())
    }

    /// A worker that deregistered ends the attempt it was still in (normally it has reported
    /// its failure already, and is in none).
    pub fn left(&self, w: &Worker, reason: &str) -> Result<()> {
        let reason = if reason.is_empty() { "deregistered" } else { reason };
        self.drop_worker(w, WorkerEventKind::Left, reason)
    }

    fn drop_worker(&self, w: &Worker, kind: WorkerEventKind, reason: &str) -> Result<()> {
        let mut t = self.table()?;
        t.departed.remove(&w.id);
        t.last_heard.remove(&w.id);
        if let Some(job_id) = t.busy.get(&w.id).cloned() {
            let why = match kind {
                WorkerEventKind::Lost => format!("worker {} lost ({reason})", w.id),
                _ => format!("worker {} left ({reason})", w.id),
            };
            let rank = t.gangs.get(&job_id).and_then(|g| g.attempt.workers.iter().position(|m| *m == w.id));
            self.worker_event(&job_id, &w.id, rank.unwrap_or(0), kind, reason.to_owned());
            self.end(&mut t, &job_id, &why, true)?;
            self.requeue(&job_id, &why)?;
        }
        Ok(())
    }

    fn requeue(&self, job_id: &str, why: &str) -> Result<()> {
        let job = self.jobs.get(job_id)?;
        if job.state.is_terminal() {
            return Ok(());
        }
        let max = job.placement.max_restarts;
        self.jobs.transition(job_id, |j| {
            if j.restarts < max {
                j.restarts += 1;
                j.state = JobState::Pending;
            } else {
                j.state = JobState::Failed;
            }
            j.reason = cap_reason(why.to_owned());
            Ok(())
        })?;
        Ok(())
    }
}

/// The step of `job_id`'s state that `worker_id` holds in memory, if it holds one.
fn held_step(t: &Table, worker_id: &str, job_id: &str) -> Option<u64> {
    t.held.get(worker_id).filter(|h| h.job_id == job_id).map(|h| h.step)
}

impl Scheduler {
    /// Records what training state a worker says it holds in memory (`None`: nothing). A claim
    /// about a job the worker never ran an attempt of, or one that has ended, is ignored: only
    /// a member may hand a job's state to the next gang. Returns false for a claim that is
    /// not kept (the worker may free that state).
    pub fn note_held(&self, worker_id: &str, held: Option<HeldState>) -> Result<bool> {
        let Some(h) = held else {
            self.table()?.held.remove(worker_id);
            return Ok(true);
        };
        let was_member = self.store.attempts(&h.job_id)?.iter().any(|a| a.workers.iter().any(|w| w == worker_id));
        let open = self.jobs.get(&h.job_id).is_ok_and(|j| !j.state.is_terminal());
        let mut t = self.table()?;
        if was_member && open {
            t.held.insert(worker_id.to_owned(), h);
        } else {
            t.held.remove(worker_id);
        }
        Ok(was_member && open)
    }
}

/// A fresh token for an attempt's ring: 64 bits from the OS's random source (the ring's
/// handshake and the wire format carry a u64), so that a connection from an older attempt, or
/// from anyone who has not been handed the assignment, cannot guess it.
fn ring_token() -> Result<u64> {
    getrandom::u64().map_err(|e| Error::Internal(format!("no randomness for the ring token: {e}")))
}

/// INVALID_ARGUMENT unless `path` is `<checkpoint.dir>/step-<n>` of the job, with n == `step`:
/// absolute, no `..` or `.` (a lexical check could not tell where they lead through symlinks).
fn checkpoint_path(checkpoint_dir: &str, step: u64, path: &str) -> Result<()> {
    let p = Path::new(path);
    let plain = p.is_absolute() && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let dir = jobspec::policy::normalize(Path::new(checkpoint_dir));
    let number = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-"));
    let number = number.filter(|n| n.bytes().all(|b| b.is_ascii_digit())).and_then(|n| n.parse::<u64>().ok());
    if plain && dir.as_deref() == p.parent() && number == Some(step) {
        return Ok(());
    }
    let want = format!("step-{step:08} directory of the job's checkpoint.dir ({checkpoint_dir})");
    Err(Error::invalid("path", format!("`{path}` is not the {want}")))
}

/// The size of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Where an attempt stands with rank 0's NCCL unique id, which every rank needs to join the
/// communicator. Rank 0 makes it and posts it in GetAssignment; the other ranks' assignments carry
/// it once it is known.
enum NcclRelay {
    /// A CPU job: the ranks meet on the CPU ring.
    NotNeeded,
    Waiting,
    Known(Vec<u8>),
}

impl NcclRelay {
    fn for_device(device: jobspec::Device) -> NcclRelay {
        match device {
            jobspec::Device::Cuda => NcclRelay::Waiting,
            jobspec::Device::Cpu => NcclRelay::NotNeeded,
        }
    }

    fn id(&self) -> &[u8] {
        match self {
            NcclRelay::Known(id) => id,
            _ => &[],
        }
    }
}

impl Scheduler {
    /// Rank 0 of the worker's current attempt posts its NCCL unique id (checked to be
    /// [`NCCL_UNIQUE_ID_BYTES`] long by the caller). Posting the same id again is a no-op, so a
    /// retried call is harmless; a different one is refused, since other ranks may have it already.
    pub fn post_nccl_id(&self, worker_id: &str, id: &[u8]) -> Result<()> {
        let mut t = self.table()?;
        let refuse = |why: String| Err(Error::FailedPrecondition(format!("nccl_unique_id: {why}")));
        let Some(job_id) = t.busy.get(worker_id).cloned() else {
            return refuse(format!("worker `{worker_id}` has no assignment"));
        };
        let Some(g) = t.gangs.get_mut(&job_id) else { return refuse(format!("job `{job_id}` is not running")) };
        let rank = g.attempt.workers.iter().position(|w| w == worker_id);
        if rank != Some(0) {
            return refuse(format!("only rank 0 posts it; worker `{worker_id}` is rank {rank:?} of `{job_id}`"));
        }
        match &g.nccl {
            NcclRelay::NotNeeded => refuse(format!("job `{job_id}` runs on the CPU ring, not NCCL")),
            NcclRelay::Known(known) if known.as_slice() == id => Ok(()),
            NcclRelay::Known(_) => refuse(format!("attempt {} of `{job_id}` already has one", g.attempt.attempt)),
            NcclRelay::Waiting => {
                tracing::info!(job = %job_id, attempt = g.attempt.attempt, "NCCL unique id posted by rank 0");
                g.nccl = NcclRelay::Known(id.to_vec());
                self.changed.notify_waiters();
                Ok(())
            }
        }
    }
}

mod wait;

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
