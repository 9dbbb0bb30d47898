//! The job manager: submit, get, list, cancel, and the per-job event broadcast behind Watch.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use jobspec::JobSpec;
use tokio::sync::broadcast;

use crate::domain::{Attempt, Clock, Job, JobEvent, JobFilter, JobState, NewJob, WorkerEvent, job_number};
use crate::error::{Error, Result};
use crate::store::{Store, placement_of};

/// Events a slow watcher may fall behind by before it skips ahead (it is then sent the job's
/// current state again).
const EVENT_BUFFER: usize = 256;

pub struct Jobs {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// One sender per job that has (or had) watchers; dropped when the job ends, which ends
    /// the watchers' streams after they drain.
    channels: Mutex<HashMap<String, broadcast::Sender<JobEvent>>>,
    /// The latest worker event of each rank of each unfinished job, so that a watcher that
    /// arrives after the gang formed still learns who is in it.
    members: Mutex<HashMap<String, BTreeMap<u32, WorkerEvent>>>,
    /// Serialises read-modify-write sequences on jobs.
    write: Mutex<()>,
    /// The step (and when it was reported) of each running job: soft state. Progress arrives
    /// many times a second per job; writing each to SQLite would fsync per step and put the
    /// coordinator's disk on every worker's step time. Reads overlay it on the stored job, and
    /// every stored transition folds it in, so it is durable at the next state change or
    /// commit; a restart shows the last stored step until rank 0 reports again.
    live: Mutex<HashMap<String, (u64, i64)>>,
    /// Counts transitions into a terminal state (and deletions), so that the scheduler sweeps
    /// its gangs only when one may have ended.
    ended: std::sync::atomic::AtomicU64,
    /// The PENDING jobs, oldest first: what scheduling reads on every poll, kept here so that
    /// a poll reads neither the store nor any job's YAML. `None` until first used (then loaded
    /// from the store); submit and transition keep it after that.
    queue: Mutex<Option<BTreeMap<(u64, String), Queued>>>,
    /// Called after a job joins the queue (submitted, or queued again), without locks held.
    queue_listeners: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    /// Goodput of each job (soft state, like `live`).
    goodput: crate::goodput::Book,
}

/// What scheduling needs of a PENDING job: the typed columns, no YAML.
#[derive(Clone, Debug, PartialEq)]
pub struct Queued {
    pub id: String,
    pub workers: u32,
    pub min_workers: u32,
    pub device: jobspec::Device,
    /// When it began to wait: its last transition (PENDING jobs change only on transitions).
    pub since_ms: i64,
}

impl Queued {
    fn key(&self) -> (u64, String) {
        (job_number(&self.id).unwrap_or(u64::MAX), self.id.clone())
    }
}

impl From<&Job> for Queued {
    fn from(j: &Job) -> Queued {
        Queued {
            id: j.id.clone(),
            workers: j.workers,
            min_workers: j.min_workers,
            device: j.placement.device,
            since_ms: j.updated_ms,
        }
    }
}

/// A watch: the job as it was when the subscription started, then its events.
pub struct Subscription {
    pub job: Job,
    /// The latest event of each rank of the job's gang, by rank (empty once the job ended).
    pub members: Vec<WorkerEvent>,
    /// `None` when the job had already ended: there is nothing more to come.
    pub events: Option<broadcast::Receiver<JobEvent>>,
}

impl Jobs {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Jobs {
        Jobs {
            store,
            clock,
            channels: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            write: Mutex::new(()),
            live: Mutex::new(HashMap::new()),
            ended: std::sync::atomic::AtomicU64::new(0),
            queue: Mutex::new(None),
            queue_listeners: Mutex::new(Vec::new()),
            goodput: crate::goodput::Book::default(),
        }
    }

    /// The PENDING jobs, oldest first, from memory (the store is read once, on first use).
    pub fn pending(&self) -> Result<Vec<Queued>> {
        self.with_queue(|q| q.values().cloned().collect())
    }

    /// Whether any job is PENDING.
    pub fn has_pending(&self) -> Result<bool> {
        self.with_queue(|q| !q.is_empty())
    }

    /// Runs `listener` whenever a job joins the queue (see `queue_listeners`).
    pub fn on_queue_change(&self, listener: impl Fn() + Send + Sync + 'static) -> Result<()> {
        Self::lock(&self.queue_listeners)?.push(Box::new(listener));
        Ok(())
    }

    fn with_queue<T>(&self, f: impl FnOnce(&BTreeMap<(u64, String), Queued>) -> T) -> Result<T> {
        let mut queue = Self::lock(&self.queue)?;
        if queue.is_none() {
            // Read with the queue locked: a transition that stored its job before this read is
            // in it, one that stores after updates the loaded queue once it gets the lock.
            let pending = self.store.list_jobs(&JobFilter { states: vec![JobState::Pending], limit: 0 })?;
            *queue = Some(pending.iter().map(|j| (Queued::from(j).key(), Queued::from(j))).collect());
        }
        Ok(f(queue.as_ref().expect("loaded above")))
    }

    /// Keeps the queue (if loaded) in step with the job's new state; true when it joined.
    fn requeue_if_pending(&self, job: &Job) -> Result<bool> {
        let mut queue = Self::lock(&self.queue)?;
        let Some(q) = queue.as_mut() else { return Ok(job.state == JobState::Pending) };
        let entry = Queued::from(job);
        if job.state == JobState::Pending {
            q.insert(entry.key(), entry);
            Ok(true)
        } else {
            q.remove(&entry.key());
            Ok(false)
        }
    }

    fn queue_changed(&self) {
        if let Ok(listeners) = Self::lock(&self.queue_listeners) {
            listeners.iter().for_each(|tell| tell());
        }
    }

    /// Changes whenever a job may have ended (see `ended`).
    pub fn ended_generation(&self) -> u64 {
        self.ended.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The stored job with the step rank 0 last reported, while it runs.
    fn overlay(&self, mut job: Job) -> Job {
        if !job.state.is_terminal()
            && let Ok(live) = Self::lock(&self.live)
            && let Some(&(step, at_ms)) = live.get(&job.id)
        {
            job.step = step;
            job.updated_ms = job.updated_ms.max(at_ms);
        }
        job.goodput = self.goodput.get(&job.id, self.clock.now_ms());
        job
    }

    fn lock<'a, T>(m: &'a Mutex<T>) -> Result<std::sync::MutexGuard<'a, T>> {
        m.lock().map_err(|_| Error::Internal("job manager lock poisoned".into()))
    }

    /// Stores a checked job; it starts PENDING.
    /// The spec is parsed here, once: the fields scheduling needs are stored as columns.
    pub fn submit(&self, spec: &JobSpec) -> Result<Job> {
        let job = {
            let _w = Self::lock(&self.write)?;
            let job = self.store.insert_job(NewJob {
                name: spec.name.clone(),
                spec_yaml: spec.to_yaml(),
                total_steps: spec.training.steps,
                workers: spec.resources.workers as u32,
                min_workers: spec.resources.min_workers as u32,
                placement: placement_of(spec),
                created_ms: self.clock.now_ms(),
            })?;
            self.requeue_if_pending(&job)?;
            job
        };
        tracing::info!(job = %job.id, name = %job.name, "job submitted");
        self.queue_changed();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Result<Job> {
        let job = self.store.get_job(id)?.ok_or_else(|| Error::NotFound(format!("job_id: no job `{id}`")))?;
        Ok(self.overlay(job))
    }

    pub fn list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        Ok(self.store.list_jobs(filter)?.into_iter().map(|j| self.overlay(j)).collect())
    }

    /// One page of at most `filter.limit` (at least 1) jobs, newest first, below job number
    /// `before` when given; true when more jobs follow.
    pub fn page(&self, filter: &JobFilter, before: Option<u64>) -> Result<(Vec<Job>, bool)> {
        let size = filter.limit.max(1);
        // One more than asked for tells whether another page follows.
        let ask = JobFilter { states: filter.states.clone(), limit: size.saturating_add(1) };
        let mut jobs = self.store.list_jobs_before(&ask, before)?;
        let more = jobs.len() > size as usize;
        jobs.truncate(size as usize);
        Ok((jobs.into_iter().map(|j| self.overlay(j)).collect(), more))
    }

    /// Deletes a SUCCEEDED, FAILED or CANCELLED job with its attempt and checkpoint records;
    /// the checkpoint files stay where they are. Returns the job as it was.
    pub fn delete(&self, id: &str) -> Result<Job> {
        let job = {
            // Under the write lock, no transition can make the job live again meanwhile.
            let _w = Self::lock(&self.write)?;
            let job = self.get(id)?;
            if !job.state.is_terminal() {
                return Err(Error::FailedPrecondition(format!(
                    "job_id: job `{id}` is {}; cancel it first (only ended jobs can be deleted)",
                    job.state.as_str()
                )));
            }
            if !self.store.delete_job(id)? {
                return Err(Error::NotFound(format!("job_id: no job `{id}`")));
            }
            job
        };
        Self::lock(&self.channels).map(|mut c| c.remove(id)).ok();
        Self::lock(&self.members).map(|mut m| m.remove(id)).ok();
        Self::lock(&self.live).map(|mut l| l.remove(id)).ok();
        self.goodput.forget(id);
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(job = %id, "job deleted");
        Ok(job)
    }

    /// Cancels a PENDING or RUNNING job.
    pub fn cancel(&self, id: &str, reason: &str) -> Result<Job> {
        let reason = if reason.trim().is_empty() { "cancelled by user" } else { reason.trim() };
        self.transition(id, |job| {
            if job.state.is_terminal() {
                return Err(Error::FailedPrecondition(format!(
                    "job_id: job `{}` already ended ({})",
                    job.id,
                    job.state.as_str()
                )));
            }
            job.state = JobState::Cancelled;
            job.reason = reason.to_owned();
            Ok(())
        })
    }

    /// Applies `change` to the stored job under the write lock, stores it with a new updated
    /// time and tells watchers. A change to a terminal state closes the job's broadcast.
    pub fn transition(&self, id: &str, change: impl FnOnce(&mut Job) -> Result<()>) -> Result<Job> {
        self.store_transition(id, None, change)
    }

    /// A gang start: [`Self::transition`], with the new attempt stored in the same store
    /// transaction (one commit, and never one of the two without the other).
    pub fn start_attempt(
        &self,
        id: &str,
        attempt: &Attempt,
        change: impl FnOnce(&mut Job) -> Result<()>,
    ) -> Result<Job> {
        let job = self.store_transition(id, Some(attempt), change)?;
        self.goodput.attempt_started(id, attempt.resume_step, attempt.started_ms);
        Ok(job)
    }

    /// The job's goodput now (`None` before its first attempt since the coordinator started).
    pub fn goodput(&self, id: &str) -> Option<crate::goodput::Goodput> {
        self.goodput.get(id, self.clock.now_ms())
    }

    /// A member of the job's current attempt had completed `step` steps.
    pub fn attempt_reached(&self, id: &str, step: u64) {
        self.goodput.reached(id, step);
    }

    /// The job's current attempt ended; `failed`: by a failure, so the job runs again.
    pub fn attempt_ended(&self, id: &str, failed: bool) {
        self.goodput.attempt_ended(id, failed, self.clock.now_ms());
    }

    fn store_transition(
        &self,
        id: &str,
        attempt: Option<&Attempt>,
        change: impl FnOnce(&mut Job) -> Result<()>,
    ) -> Result<Job> {
        let (job, queued) = {
            let _w = Self::lock(&self.write)?;
            let mut job = self.get(id)?;
            change(&mut job)?;
            job.updated_ms = self.clock.now_ms();
            match attempt {
                Some(a) => self.store.start_attempt(&job, a)?,
                None => self.store.update_job(&job)?,
            }
            if job.state.is_terminal() {
                self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.goodput.job_ended(id, job.updated_ms);
            }
            // The stored job now holds the live step (read above) or the one `change` set (a
            // restart from a checkpoint): the live value is spent.
            Self::lock(&self.live)?.remove(id);
            let queued = self.requeue_if_pending(&job)?;
            (job, queued)
        };
        if queued {
            self.queue_changed();
        }
        tracing::info!(job = %job.id, state = job.state.as_str(), reason = %job.reason, "job state");
        self.publish(&job.id, JobEvent::Job(job.clone()));
        if job.state.is_terminal() {
            Self::lock(&self.channels).map(|mut c| c.remove(&job.id)).ok();
            Self::lock(&self.members).map(|mut m| m.remove(&job.id)).ok();
            Self::lock(&self.live).map(|mut l| l.remove(&job.id)).ok();
        }
        Ok(job)
    }

    /// Records the step rank 0 reached, in memory only (see `live`); no Job event: the caller
    /// publishes the progress.
    pub fn set_step(&self, id: &str, step: u64) -> Result<()> {
        let now = self.clock.now_ms();
        Self::lock(&self.live)?.insert(id.to_owned(), (step, now));
        self.goodput.progress(id, step, now);
        Ok(())
    }

    /// Sends an event to the job's watchers, if any.
    pub fn publish(&self, id: &str, event: JobEvent) {
        if let JobEvent::Worker(w) = &event
            && let Ok(mut members) = Self::lock(&self.members)
        {
            members.entry(id.to_owned()).or_default().insert(w.rank, w.clone());
        }
        if let Ok(channels) = Self::lock(&self.channels)
            && let Some(tx) = channels.get(id)
        {
            // An error only means that nobody is watching right now.
            let _ = tx.send(event);
        }
    }

    /// Subscribes to a job's events. Subscribing before reading the job means no event between
    /// the read and the first received event is lost.
    pub fn watch(&self, id: &str) -> Result<Subscription> {
        let rx = {
            let mut channels = Self::lock(&self.channels)?;
            channels.entry(id.to_owned()).or_insert_with(|| broadcast::channel(EVENT_BUFFER).0).subscribe()
        };
        let job = match self.get(id) {
            Ok(job) => job,
            Err(e) => {
                self.forget_if_unwatched(id);
                return Err(e);
            }
        };
        if job.state.is_terminal() {
            self.forget_if_unwatched(id);
            // Members that reported after the job ended (e.g. rank 1 leaving) are dropped here.
            Self::lock(&self.members)?.remove(id);
            return Ok(Subscription { job, members: Vec::new(), events: None });
        }
        let members = Self::lock(&self.members)?.get(id).map(|m| m.values().cloned().collect()).unwrap_or_default();
        Ok(Subscription { job, members, events: Some(rx) })
    }

    fn forget_if_unwatched(&self, id: &str) {
        if let Ok(mut channels) = Self::lock(&self.channels)
            && channels.get(id).is_some_and(|tx| tx.receiver_count() <= 1)
        {
            channels.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::domain::{FakeClock, Progress};
    use crate::store::MemStore;

    pub(crate) const JOB: &str = "name: t\nmodel: { init: /m }\ndata: { train: /d.jsonl }\n\
        training: { steps: 10, global_batch: 4 }\nresources: { workers: 2, device: cpu }\n";

    fn jobs() -> Jobs {
        Jobs::new(Arc::new(MemStore::default()), Arc::new(FakeClock::new(1000)))
    }

    fn spec() -> JobSpec {
        JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()
    }

    /// Progress is soft state: readers see every reported step, the store sees none of them
    /// until the job's next transition, which keeps the latest.
    #[test]
    fn steps_are_soft_state_folded_in_at_the_next_transition() {
        let store = Arc::new(MemStore::default());
        let j = Jobs::new(store.clone(), Arc::new(FakeClock::new(1000)));
        let job = j.submit(&spec()).unwrap();
        j.transition(&job.id, |job| {
            job.state = JobState::Running;
            Ok(())
        })
        .unwrap();
        for step in 1..=50 {
            j.set_step(&job.id, step).unwrap();
        }
        assert_eq!(j.get(&job.id).unwrap().step, 50);
        assert_eq!(j.list(&JobFilter::default()).unwrap()[0].step, 50);
        assert_eq!(store.get_job(&job.id).unwrap().unwrap().step, 0, "a step report reached the store");
        let ended = j.cancel(&job.id, "").unwrap();
        assert_eq!(ended.step, 50);
        assert_eq!(store.get_job(&job.id).unwrap().unwrap().step, 50);
        // A finished job shows its stored step, whatever arrives late.
        j.set_step(&job.id, 7).unwrap();
        assert_eq!(j.get(&job.id).unwrap().step, 50);
    }

    #[test]
    fn submit_get_list_cancel() {
        let j = jobs();
        let a = j.submit(&spec()).unwrap();
        let b = j.submit(&spec()).unwrap();
        assert_eq!((a.state, a.total_steps, a.workers), (JobState::Pending, 10, 2));
        assert_ne!(a.id, b.id);
        assert_eq!(j.list(&JobFilter::default()).unwrap().iter().map(|x| &x.id).collect::<Vec<_>>(), [&b.id, &a.id]);
        let c = j.cancel(&a.id, "").unwrap();
        assert_eq!((c.state, c.reason.as_str()), (JobState::Cancelled, "cancelled by user"));
        let only = j.list(&JobFilter { states: vec![JobState::Cancelled], limit: 0 }).unwrap();
        assert_eq!(only.len(), 1);
        assert!(matches!(j.cancel(&a.id, ""), Err(Error::FailedPrecondition(_))));
        assert!(matches!(j.get("job-99"), Err(Error::NotFound(_))));
    }

    #[tokio::test]
    async fn watch_sees_events_then_closes_on_terminal_state() {
        let j = jobs();
        let job = j.submit(&spec()).unwrap();
        let mut sub = j.watch(&job.id).unwrap();
        assert_eq!(sub.job.state, JobState::Pending);
        let rx = sub.events.as_mut().unwrap();
        j.publish(&job.id, JobEvent::Progress(Progress { step: 1, ..Progress::default() }));
        j.cancel(&job.id, "stop").unwrap();
        assert!(matches!(rx.recv().await.unwrap(), JobEvent::Progress(p) if p.step == 1));
        assert!(matches!(rx.recv().await.unwrap(), JobEvent::Job(x) if x.state == JobState::Cancelled));
        assert!(rx.recv().await.is_err(), "closed after the terminal state");
        let again = j.watch(&job.id).unwrap();
        assert!(again.events.is_none());
    }

    #[test]
    fn a_late_watcher_learns_the_latest_event_of_each_member() {
        use crate::domain::{WorkerEvent, WorkerEventKind};
        let j = jobs();
        let job = j.submit(&spec()).unwrap();
        let event = |rank: u32, kind, message: &str| {
            JobEvent::Worker(WorkerEvent { worker_id: format!("w{rank}"), rank, kind, message: message.into() })
        };
        j.publish(&job.id, event(1, WorkerEventKind::Joined, "attempt 1"));
        j.publish(&job.id, event(0, WorkerEventKind::Joined, "attempt 1"));
        j.publish(&job.id, event(0, WorkerEventKind::Checkpoint, "step 4"));
        let members: Vec<(u32, WorkerEventKind, String)> =
            j.watch(&job.id).unwrap().members.into_iter().map(|w| (w.rank, w.kind, w.message)).collect();
        assert_eq!(
            members,
            [(0, WorkerEventKind::Checkpoint, "step 4".to_owned()), (1, WorkerEventKind::Joined, "attempt 1".into())]
        );
        j.cancel(&job.id, "").unwrap();
        j.publish(&job.id, event(1, WorkerEventKind::Left, "done"));
        assert!(j.watch(&job.id).unwrap().members.is_empty(), "an ended job has no gang");
        assert!(j.watch(&job.id).unwrap().members.is_empty());
    }
}
