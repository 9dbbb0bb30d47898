//! Scheduler unit tests (a FakeClock and the in-memory store).

use std::hash::BuildHasher;
use std::path::Path;
use std::time::Duration;

use jobspec::JobSpec;

use super::*;
use crate::domain::{FakeClock, Job};
use crate::store::MemStore;
use crate::workers::Registration;

const JOB: &str = "name: t\nmodel: { init: /m }\ndata: { train: /d.jsonl }\n\
    training: { steps: 10, global_batch: 4 }\nresources: { workers: 2, device: cpu, max_restarts: 1 }\n\
    checkpoint: { dir: /c }\n";

fn setup() -> (Scheduler, Arc<Jobs>, Arc<Workers>) {
    let clock: Arc<dyn Clock> = Arc::new(FakeClock::new(1000));
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let jobs = Arc::new(Jobs::new(store.clone(), clock.clone()));
    let workers =
        Arc::new(Workers::load(store.clone(), clock.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap());
    let s = Scheduler::new(jobs.clone(), workers.clone(), store, clock).unwrap();
    (s, jobs, workers)
}

const ELASTIC: &str = "name: e\nmodel: { init: /m }\ndata: { train: /d.jsonl }\n\
    training: { steps: 10, global_batch: 12 }\n\
    resources: { workers: 3, min_workers: 2, device: cpu, max_restarts: 5 }\ncheckpoint: { dir: /c }\n";

fn setup_with_clock() -> (Scheduler, Arc<Jobs>, Arc<Workers>, Arc<FakeClock>) {
    let fake = Arc::new(FakeClock::new(1000));
    let clock: Arc<dyn Clock> = fake.clone();
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let jobs = Arc::new(Jobs::new(store.clone(), clock.clone()));
    let workers =
        Arc::new(Workers::load(store.clone(), clock.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap());
    let s = Scheduler::new(jobs.clone(), workers.clone(), store, clock)
        .unwrap()
        .with_elastic_wait(Duration::from_millis(3_000));
    (s, jobs, workers, fake)
}

fn reg(w: &Workers, port: u16) -> String {
    let r = Registration {
        hostname: "h".into(),
        device: jobspec::Device::Cpu,
        device_index: 0,
        ring_address: format!("127.0.0.1:{port}"),
        version: "0".into(),
    };
    w.register(r).unwrap().id
}

#[test]
fn gang_forms_runs_fails_requeues_and_succeeds() {
    let (s, jobs, workers) = setup();
    let spec = JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap();
    let job = jobs.submit(&spec).unwrap();
    let a = reg(&workers, 1);
    assert_eq!(s.assignment(&a).unwrap(), None, "one worker is not a gang of two");
    let b = reg(&workers, 2);
    let ab = s.assignment(&b).unwrap().unwrap();
    let aa = s.assignment(&a).unwrap().unwrap();
    assert_eq!((aa.rank, ab.rank, aa.world_size, aa.attempt), (0, 1, 2, 1));
    assert_eq!(aa.ring_peers, ["127.0.0.1:1", "127.0.0.1:2"]);
    assert_eq!(aa.ring_token, ab.ring_token);
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Running);

    let ra = AttemptRef { worker_id: a.clone(), job_id: job.id.clone(), attempt: 1 };
    let rb = AttemptRef { worker_id: b.clone(), ..ra.clone() };
    let p = Progress { step: 3, ..Progress::default() };
    assert_eq!(s.progress(&ra, p).unwrap(), Command::Continue);
    assert_eq!(jobs.get(&job.id).unwrap().step, 3);
    s.commit_checkpoint(&ra, 3, "/c/step-00000003".into(), String::new()).unwrap();

    s.failed(&rb, "boom", FailureKind::Error).unwrap();
    let j = jobs.get(&job.id).unwrap();
    assert_eq!((j.state, j.restarts), (JobState::Pending, 1));
    assert!(j.reason.contains("boom"), "{}", j.reason);
    assert_eq!(s.command(&ra).unwrap(), Command::Stop);

    let aa = s.assignment(&a).unwrap().unwrap();
    assert_eq!((aa.attempt, aa.resume_step, aa.resume_checkpoint.as_str()), (2, 3, "/c/step-00000003"));
    let ra = AttemptRef { attempt: 2, ..ra };
    let rb = AttemptRef { attempt: 2, ..rb };
    s.done(&rb, 10).unwrap();
    s.done(&ra, 10).unwrap();
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Succeeded);
    assert_eq!(s.assignment(&a).unwrap(), None);
}

#[test]
fn cancel_stops_the_gang_and_frees_its_workers() {
    let (s, jobs, workers) = setup();
    let job = jobs.submit(&JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b) = (reg(&workers, 1), reg(&workers, 2));
    assert!(s.assignment(&a).unwrap().is_some());
    let ra = AttemptRef { worker_id: a.clone(), job_id: job.id.clone(), attempt: 1 };
    assert_eq!(s.command(&ra).unwrap(), Command::Continue);
    jobs.cancel(&job.id, "").unwrap();
    assert_eq!(s.progress(&ra, Progress::default()).unwrap(), Command::Stop);
    s.failed(&AttemptRef { worker_id: b.clone(), ..ra }, "aborted", FailureKind::Error).unwrap();
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Cancelled);
    // Both are idle again: a new job gets them.
    let next = jobs.submit(&JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()).unwrap();
    assert_eq!(s.assignment(&b).unwrap().unwrap().job_id, next.id);
}

#[test]
fn failures_past_max_restarts_fail_the_job() {
    let (s, jobs, workers) = setup();
    let job = jobs.submit(&JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b) = (reg(&workers, 1), reg(&workers, 2));
    for attempt in 1..=2 {
        assert!(s.assignment(&a).unwrap().is_some());
        s.failed(&AttemptRef { worker_id: b.clone(), job_id: job.id.clone(), attempt }, "x", FailureKind::Error)
            .unwrap();
    }
    let j = jobs.get(&job.id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.reason.contains("failed: x"), "{}", j.reason);
}

#[test]
fn short_gang_starts_only_after_the_elastic_wait_and_never_below_min_workers() {
    let (s, jobs, workers, clock) = setup_with_clock();
    let job = jobs.submit(&JobSpec::from_str(ELASTIC, Path::new("job_yaml")).unwrap()).unwrap();
    let a = reg(&workers, 1);
    clock.advance(10_000);
    assert_eq!(s.assignment(&a).unwrap(), None, "one worker is below min_workers (2), however long it waits");
    let b = reg(&workers, 2);
    // The job has waited long already: two of three start at once.
    let ab = s.assignment(&b).unwrap().unwrap();
    assert_eq!((ab.world_size, ab.rank, ab.attempt), (2, 1, 1));
    assert_eq!(s.assignment(&a).unwrap().unwrap().rank, 0);
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Running);
}

#[test]
fn full_gang_starts_at_once_and_a_lost_worker_re_forms_the_job_on_the_survivors() {
    let (s, jobs, workers, clock) = setup_with_clock();
    let job = jobs.submit(&JobSpec::from_str(ELASTIC, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b) = (reg(&workers, 1), reg(&workers, 2));
    assert_eq!(s.assignment(&a).unwrap(), None, "2 of 3 must wait for the elastic grace");
    let c = reg(&workers, 3);
    let first = s.assignment(&c).unwrap().unwrap();
    assert_eq!((first.world_size, first.rank), (3, 2), "a full gang needs no wait");
    let ra = AttemptRef { worker_id: a.clone(), job_id: job.id.clone(), attempt: 1 };
    s.commit_checkpoint(&ra, 4, "/c/step-00000004".into(), String::new()).unwrap();

    // c goes silent: the reaper declares it dead and the attempt ends.
    for _ in 0..3 {
        clock.advance(2_000);
        workers.heartbeat(&a).unwrap();
        workers.heartbeat(&b).unwrap();
    }
    let dead = workers.reap().unwrap();
    assert_eq!(dead.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), [c.as_str()]);
    s.lost(&dead).unwrap();
    let j = jobs.get(&job.id).unwrap();
    assert_eq!((j.state, j.restarts), (JobState::Pending, 1));
    assert!(j.reason.contains("lost"), "{}", j.reason);

    clock.advance(2_999);
    assert_eq!(s.assignment(&a).unwrap(), None, "still inside the elastic wait");
    assert_eq!(s.assignment(&b).unwrap(), None, "still inside the elastic wait");
    clock.advance(1);
    let again = s.assignment(&a).unwrap().unwrap();
    assert_eq!((again.attempt, again.world_size, again.rank), (2, 2, 0));
    assert_eq!((again.resume_step, again.resume_checkpoint.as_str()), (4, "/c/step-00000004"));
    assert_eq!(s.assignment(&b).unwrap().unwrap().rank, 1);
}

#[test]
fn a_worker_leaving_on_sigterm_is_not_scheduled_again() {
    let (s, jobs, workers, clock) = setup_with_clock();
    let job = jobs.submit(&JobSpec::from_str(ELASTIC, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b, c) = (reg(&workers, 1), reg(&workers, 2), reg(&workers, 3));
    assert_eq!(s.assignment(&a).unwrap().unwrap().world_size, 3);
    let rb = AttemptRef { worker_id: b.clone(), job_id: job.id.clone(), attempt: 1 };
    s.failed(&rb, "worker shutting down (SIGTERM)", FailureKind::WorkerShutdown).unwrap();
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Pending);
    clock.advance(3_000);
    // b still heartbeats (it is alive until it exits) but must not join the new gang.
    workers.heartbeat(&b).unwrap();
    assert_eq!(s.assignment(&b).unwrap(), None);
    assert_eq!(s.assignment(&a).unwrap(), None, "c has not asked for work lately");
    let ac = s.assignment(&c).unwrap().unwrap();
    assert_eq!(ac.world_size, 2);
    assert_eq!(ac.ring_peers, ["127.0.0.1:1", "127.0.0.1:3"]);
}

#[test]
fn nccl_unique_id_goes_from_rank_0_to_the_other_ranks_of_its_attempt_only() {
    use std::collections::hash_map::RandomState;
    let (s, jobs, workers) = setup();
    let cuda = JOB.replace("device: cpu", "device: cuda");
    let job = jobs.submit(&JobSpec::from_str(&cuda, Path::new("job_yaml")).unwrap()).unwrap();
    let gpu = |port: u16| {
        let r = Registration {
            hostname: "g".into(),
            device: jobspec::Device::Cuda,
            device_index: 0,
            ring_address: format!("127.0.0.1:{port}"),
            version: "0".into(),
        };
        workers.register(r).unwrap().id
    };
    let (a, b) = (gpu(1), gpu(2));
    let (aa, ab) = (s.assignment(&a).unwrap().unwrap(), s.assignment(&b).unwrap().unwrap());
    assert_eq!((aa.rank, ab.rank), (0, 1));
    assert!(aa.uses_nccl && aa.nccl_unique_id.is_empty() && ab.nccl_unique_id.is_empty());

    let random = RandomState::new();
    let id: Vec<u8> = (0..NCCL_UNIQUE_ID_BYTES).map(|i| random.hash_one(i) as u8).collect();
    let refused = |r: Result<()>, what: &str| match r {
        Err(Error::FailedPrecondition(m)) => assert!(m.starts_with("nccl_unique_id: ") && m.contains(what), "{m}"),
        other => panic!("expected FAILED_PRECONDITION about {what}, got {other:?}"),
    };
    refused(s.post_nccl_id(&b, &id), "only rank 0");
    assert!(s.assignment(&b).unwrap().unwrap().nccl_unique_id.is_empty());
    s.post_nccl_id(&a, &id).unwrap();
    s.post_nccl_id(&a, &id).unwrap();
    let other: Vec<u8> = id.iter().map(|x| x ^ 1).collect();
    refused(s.post_nccl_id(&a, &other), "already has one");
    assert_eq!(s.assignment(&b).unwrap().unwrap().nccl_unique_id, id);
    assert_eq!(s.assignment(&a).unwrap().unwrap().nccl_unique_id, id);

    // A new attempt needs a new communicator: it starts without an id.
    s.failed(&AttemptRef { worker_id: b.clone(), job_id: job.id.clone(), attempt: 1 }, "x", FailureKind::Error)
        .unwrap();
    refused(s.post_nccl_id(&a, &id), "no assignment");
    let again = s.assignment(&a).unwrap().unwrap();
    assert_eq!(again.attempt, 2);
    assert!(again.nccl_unique_id.is_empty());

    // CPU jobs have no NCCL id to relay.
    let one = JOB.replace("workers: 2", "workers: 1");
    jobs.submit(&JobSpec::from_str(&one, Path::new("job_yaml")).unwrap()).unwrap();
    let c = reg(&workers, 3);
    let ac = s.assignment(&c).unwrap().unwrap();
    assert!(!ac.uses_nccl && ac.nccl_unique_id.is_empty());
    refused(s.post_nccl_id(&c, &id), "CPU ring");
}

#[test]
fn a_worker_that_stopped_polling_is_left_out_of_a_new_gang() {
    let (s, jobs, workers, clock) = setup_with_clock();
    jobs.submit(&JobSpec::from_str(ELASTIC, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b, c) = (reg(&workers, 1), reg(&workers, 2), reg(&workers, 3));
    clock.advance(5_000);
    // c still heartbeats (say it hangs, or was killed a moment ago) but asks for no work.
    workers.heartbeat(&c).unwrap();
    assert_eq!(s.assignment(&a).unwrap(), None, "b and c have not polled since registering");
    let ab = s.assignment(&b).unwrap().unwrap();
    assert_eq!(ab.world_size, 2);
    assert_eq!(ab.ring_peers, ["127.0.0.1:1", "127.0.0.1:2"]);
    assert_eq!(s.assignment(&c).unwrap(), None, "c is idle but the job already runs");
}

#[test]
fn members_of_an_ended_attempt_must_ask_again_before_joining_a_gang() {
    let (s, jobs, workers, clock) = setup_with_clock();
    let job = jobs.submit(&JobSpec::from_str(ELASTIC, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b, c) = (reg(&workers, 1), reg(&workers, 2), reg(&workers, 3));
    assert_eq!(s.assignment(&a).unwrap().unwrap().world_size, 3);
    assert_eq!(s.assignment(&c).unwrap().unwrap().rank, 2);
    // b fails at once (c was just killed, say): no time passes, yet c is not taken again.
    s.failed(&AttemptRef { worker_id: b.clone(), job_id: job.id.clone(), attempt: 1 }, "x", FailureKind::Error)
        .unwrap();
    assert_eq!(s.assignment(&a).unwrap(), None);
    assert_eq!(s.assignment(&b).unwrap(), None, "2 of 3 wait for the elastic grace");
    clock.advance(3_000);
    assert_eq!(s.assignment(&a).unwrap(), None, "b asked 3 s ago: not lately");
    let again = s.assignment(&b).unwrap().unwrap();
    assert_eq!((again.attempt, again.world_size), (2, 2));
    assert_eq!(again.ring_peers, ["127.0.0.1:1", "127.0.0.1:2"]);
}

#[test]
fn watchers_see_members_join_checkpoint_fail_and_rank_0_evaluations() {
    let (s, jobs, workers) = setup();
    let job = jobs.submit(&JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()).unwrap();
    let mut sub = jobs.watch(&job.id).unwrap();
    let rx = sub.events.as_mut().unwrap();
    let a = reg(&workers, 1);
    assert!(s.assignment(&a).unwrap().is_none());
    let b = reg(&workers, 2);
    assert!(s.assignment(&b).unwrap().is_some());
    let ra = AttemptRef { worker_id: a.clone(), job_id: job.id.clone(), attempt: 1 };
    let rb = AttemptRef { worker_id: b.clone(), ..ra.clone() };
    let e = EvalMetrics { step: 4, loss: 2.5, bleu: Some(12.0), ..EvalMetrics::default() };
    s.eval(&rb, e.clone()).unwrap();
    s.eval(&ra, e.clone()).unwrap();
    s.commit_checkpoint(&ra, 4, "/c/step-00000004".into(), String::new()).unwrap();
    s.failed(&rb, "peer gone", FailureKind::Error).unwrap();

    let mut seen = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            JobEvent::Worker(w) => seen.push(format!("{:?} {} rank {} {}", w.kind, w.worker_id, w.rank, w.message)),
            JobEvent::Eval(got) => seen.push(format!("eval {} {}", got.step, got.loss)),
            JobEvent::Job(_) | JobEvent::Progress(_) => {}
        }
    }
    assert_eq!(
        seen,
        [
            format!("Joined {a} rank 0 attempt 1: rank 0 of 2, from the start"),
            format!("Joined {b} rank 1 attempt 1: rank 1 of 2, from the start"),
            "eval 4 2.5".to_owned(),
            format!("Checkpoint {a} rank 0 step 4"),
            format!("Failed {b} rank 1 peer gone"),
        ],
        "rank 1's evaluation is not published"
    );
}

#[test]
fn a_short_gang_grows_at_its_next_checkpoint_when_workers_are_idle() {
    let (s, jobs, workers, clock) = setup_with_clock();
    let job = jobs.submit(&JobSpec::from_str(ELASTIC, Path::new("job_yaml")).unwrap()).unwrap();
    let a = reg(&workers, 1);
    clock.advance(10_000);
    assert_eq!(s.assignment(&a).unwrap(), None);
    let b = reg(&workers, 2);
    assert_eq!(s.assignment(&b).unwrap().unwrap().world_size, 2);
    let ra = AttemptRef { worker_id: a.clone(), job_id: job.id.clone(), attempt: 1 };
    // Nobody idle: the short gang goes on.
    assert_eq!(s.commit_checkpoint(&ra, 2, "/c/step-00000002".into(), String::new()).unwrap(), Command::Continue);

    let c = reg(&workers, 3);
    assert_eq!(s.assignment(&c).unwrap(), None, "no pending job for the newcomer");
    assert_eq!(s.commit_checkpoint(&ra, 4, "/c/step-00000004".into(), String::new()).unwrap(), Command::Stop);
    let j = jobs.get(&job.id).unwrap();
    assert_eq!((j.state, j.restarts), (JobState::Pending, 0), "growing is not a restart");
    assert!(j.reason.contains("scaling up from 2 to 3"), "{}", j.reason);
    assert_eq!(s.command(&ra).unwrap(), Command::Stop);

    // No elastic wait this time (the clock stands still): the three form the gang at once, from step 4.
    assert_eq!(s.assignment(&a).unwrap(), None, "b has not asked again since its attempt ended");
    let got: Vec<Assignment> = [&b, &a, &c].iter().map(|w| s.assignment(w).unwrap().unwrap()).collect();
    assert!(got.iter().all(|g| (g.world_size, g.attempt, g.resume_step) == (3, 2, 4)), "{got:?}");
    let ra = AttemptRef { attempt: 2, ..ra };
    assert_eq!(
        s.commit_checkpoint(&ra, 6, "/c/step-00000006".into(), String::new()).unwrap(),
        Command::Continue,
        "full size"
    );
}

/// A job running on a gang of two, and a third idle worker that is not part of it.
fn running_with_outsider() -> (Scheduler, Arc<Jobs>, Job, AttemptRef, String) {
    let (s, jobs, workers) = setup();
    let job = jobs.submit(&JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()).unwrap();
    let (a, b) = (reg(&workers, 1), reg(&workers, 2));
    s.assignment(&b).unwrap().unwrap();
    assert_eq!(s.assignment(&a).unwrap().unwrap().rank, 0);
    let outsider = reg(&workers, 3);
    assert_eq!(s.assignment(&outsider).unwrap(), None);
    let ra = AttemptRef { worker_id: a, job_id: job.id.clone(), attempt: 1 };
    s.progress(&ra, Progress { step: 2, ..Progress::default() }).unwrap();
    (s, jobs, job, ra, outsider)
}

#[test]
fn reports_about_an_attempt_the_worker_is_not_in_are_permission_denied() {
    let (s, jobs, job, ra, outsider) = running_with_outsider();
    let before = jobs.get(&job.id).unwrap();
    let forged = AttemptRef { worker_id: outsider, ..ra.clone() };
    let denied = |r: Result<()>| assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    denied(s.done(&forged, 10));
    denied(s.failed(&forged, "x", FailureKind::InputError));
    denied(s.commit_checkpoint(&forged, 10, "/c/step-00000010".into(), String::new()).map(|_| ()));
    denied(s.progress(&forged, Progress { step: 9, ..Progress::default() }).map(|_| ()));
    denied(s.eval(&forged, EvalMetrics::default()));
    // Nor may it name another attempt number of the job.
    denied(s.done(&AttemptRef { attempt: 7, ..ra.clone() }, 10));
    let after = jobs.get(&job.id).unwrap();
    assert_eq!((after.state, after.step, after.reason.as_str()), (before.state, 2, ""));
    assert_eq!(s.store.latest_checkpoint(&job.id).unwrap(), None);
    // A member's late report about its ended attempt is still accepted, and changes nothing.
    s.failed(&ra, "peer gone", FailureKind::Error).unwrap();
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Pending);
    s.done(&ra, 10).unwrap();
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Pending);
}

#[test]
fn a_commit_outside_the_jobs_checkpoint_dir_is_refused() {
    let (s, _jobs, job, ra, _) = running_with_outsider();
    for bad in
        ["/etc", "/c/step-00000004/../../etc", "/c/step-00000005", "c/step-00000004", "/c/step-4x", "/cc/step-00000004"]
    {
        let e = s.commit_checkpoint(&ra, 4, bad.into(), String::new()).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.starts_with("path: ")), "{bad}: {e}");
    }
    assert_eq!(s.store.latest_checkpoint(&job.id).unwrap(), None);
    s.commit_checkpoint(&ra, 4, "/c/step-00000004".into(), String::new()).unwrap();
    assert_eq!(s.store.latest_checkpoint(&job.id).unwrap().unwrap().step, 4);
}

#[test]
fn an_input_error_fails_the_job_at_once_and_reasons_are_capped() {
    let (s, jobs, job, ra, _) = running_with_outsider();
    s.failed(&ra, &"data.train: outside the allowed roots ".repeat(200), FailureKind::InputError).unwrap();
    let j = jobs.get(&job.id).unwrap();
    assert_eq!((j.state, j.restarts), (JobState::Failed, 0), "max_restarts is 1, yet no retry");
    assert!(j.reason.contains("data.train: ") && j.reason.len() <= crate::convert::MAX_REASON, "{}", j.reason.len());
}

/// A store whose every job comes back with YAML that does not parse, as if spoiled after
/// submit: scheduling must run on the typed columns alone.
struct SpoiledYaml(MemStore);

impl SpoiledYaml {
    fn spoil(mut j: Job) -> Job {
        j.spec_yaml = "resources: [this is not a job".into();
        j
    }
}

impl Store for SpoiledYaml {
    fn insert_job(&self, job: crate::domain::NewJob) -> Result<Job> {
        self.0.insert_job(job).map(Self::spoil)
    }
    fn get_job(&self, id: &str) -> Result<Option<Job>> {
        Ok(self.0.get_job(id)?.map(Self::spoil))
    }
    fn list_jobs_before(&self, filter: &JobFilter, before: Option<u64>) -> Result<Vec<Job>> {
        Ok(self.0.list_jobs_before(filter, before)?.into_iter().map(Self::spoil).collect())
    }
    fn delete_job(&self, id: &str) -> Result<bool> {
        self.0.delete_job(id)
    }
    fn update_job(&self, job: &Job) -> Result<()> {
        self.0.update_job(job)
    }
    fn put_attempt(&self, attempt: &Attempt) -> Result<()> {
        self.0.put_attempt(attempt)
    }
    fn start_attempt(&self, job: &Job, attempt: &Attempt) -> Result<()> {
        self.0.start_attempt(job, attempt)
    }
    fn attempts(&self, job_id: &str) -> Result<Vec<Attempt>> {
        self.0.attempts(job_id)
    }
    fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        self.0.insert_checkpoint(c)
    }
    fn latest_checkpoint(&self, job_id: &str) -> Result<Option<Checkpoint>> {
        self.0.latest_checkpoint(job_id)
    }
    fn put_worker(&self, w: &Worker) -> Result<()> {
        self.0.put_worker(w)
    }
    fn workers(&self) -> Result<Vec<Worker>> {
        self.0.workers()
    }
}

/// The scheduler parses no YAML after submit: with every stored YAML unparseable, a job still
/// forms its gang (device and size from the columns), commits under its checkpoint.dir, and is
/// queued again up to its max_restarts (1), then failed.
#[test]
fn scheduling_reads_the_typed_columns_not_the_yaml() {
    let clock: Arc<dyn Clock> = Arc::new(FakeClock::new(1000));
    let store: Arc<dyn Store> = Arc::new(SpoiledYaml(MemStore::default()));
    let jobs = Arc::new(Jobs::new(store.clone(), clock.clone()));
    let workers =
        Arc::new(Workers::load(store.clone(), clock.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap());
    let s = Scheduler::new(jobs.clone(), workers.clone(), store, clock).unwrap();
    let job = jobs.submit(&JobSpec::from_str(JOB, Path::new("job_yaml")).unwrap()).unwrap();
    assert!(JobSpec::from_str(&jobs.get(&job.id).unwrap().spec_yaml, Path::new("x")).is_err(), "spoiled");
    let a = reg(&workers, 1);
    assert_eq!(s.assignment(&a).unwrap(), None, "2 workers wanted, 1 there");
    let b = reg(&workers, 2);
    let ab = s.assignment(&b).unwrap().expect("the gang forms without parsing the job");
    assert_eq!((ab.world_size, ab.rank, ab.uses_nccl), (2, 1, false));
    let ra = AttemptRef { worker_id: a.clone(), job_id: job.id.clone(), attempt: 1 };
    s.commit_checkpoint(&ra, 4, "/c/step-00000004".into(), String::new()).unwrap();
    assert!(matches!(
        s.commit_checkpoint(&ra, 5, "/d/step-00000005".into(), String::new()),
        Err(Error::InvalidArgument(_))
    ));
    s.failed(&ra, "boom", FailureKind::Error).unwrap();
    assert_eq!((jobs.get(&job.id).unwrap().state, jobs.get(&job.id).unwrap().restarts), (JobState::Pending, 1));
    assert_eq!(s.assignment(&a).unwrap(), None);
    assert_eq!(s.assignment(&b).unwrap().unwrap().attempt, 2);
    s.failed(&AttemptRef { attempt: 2, ..ra }, "boom", FailureKind::Error).unwrap();
    assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Failed, "max_restarts 1 from its column");
}

/// A survivor that holds the job's state in memory is put in the new gang (before idle workers
/// registered earlier), and the attempt resumes from its step, named by its rank. Claims from a
/// worker that never ran the job, and states at the last step, are not used.
#[test]
fn a_gang_resumes_from_the_newest_state_a_member_holds() {
    let (s, jobs, workers) = setup();
    let spec = JOB.replace("max_restarts: 1", "max_restarts: 5");
    let job = jobs.submit(&JobSpec::from_str(&spec, Path::new("job_yaml")).unwrap()).unwrap();
    let ws = [reg(&workers, 1), reg(&workers, 2), reg(&workers, 3)];
    assert!(s.assignment(&ws[0]).unwrap().is_some());
    let ranks: Vec<Option<u32>> = ws.iter().map(|w| s.assignment(w).unwrap().map(|a| a.rank)).collect();
    let by_rank = |r: u32| ws[ranks.iter().position(|&x| x == Some(r)).unwrap()].clone();
    let (m0, m1) = (by_rank(0), by_rank(1));
    let idle = ws[ranks.iter().position(|x| x.is_none()).unwrap()].clone();
    let at = |w: &str, attempt: u32| AttemptRef { worker_id: w.to_owned(), job_id: job.id.clone(), attempt };
    s.commit_checkpoint(&at(&m0, 1), 2, "/c/step-00000002".into(), String::new()).unwrap();
    let held = |step: u64| Some(HeldState { job_id: job.id.clone(), step });
    // The idle worker never ran the job: its claim is ignored.
    assert!(!s.note_held(&idle, held(9)).unwrap(), "told to free it");
    // Rank 1 survives at step 6 and says so as it reports the failure; rank 0 reports too.
    assert!(s.note_held(&m1, held(6)).unwrap());
    s.failed(&at(&m1, 1), "peer gone", FailureKind::Error).unwrap();
    s.failed(&at(&m0, 1), "peer gone", FailureKind::Error).unwrap();
    // Rank 0 registered before rank 1, but the holder is preferred.
    let next = s.assignment(&idle).unwrap().unwrap();
    let holder = s.assignment(&m1).unwrap().expect("the holder joins the new gang");
    assert_eq!(s.assignment(&m0).unwrap(), None);
    assert_eq!(next.attempt, 2);
    assert_eq!((next.resume_peer_rank, next.resume_step), (Some(holder.rank), 6), "{next:?}");
    assert_eq!(holder.resume_peer_rank, Some(holder.rank));
    assert_eq!(next.resume_checkpoint, "/c/step-00000002");
    // A state at the last step is never resumed from (its final checkpoint may be missing).
    s.note_held(&m1, held(10)).unwrap();
    s.failed(&at(&m1, 2), "gone again", FailureKind::Error).unwrap();
    s.failed(&at(&idle, 2), "gone again", FailureKind::Error).unwrap();
    let third = s.assignment(&m1).unwrap().unwrap();
    assert_eq!((third.attempt, third.resume_peer_rank, third.resume_step), (3, None, 2));
}
