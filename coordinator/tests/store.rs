//! The [`Store`] contract, run against SQLite and the in-memory fake alike, and SQLite's
//! persistence across reopening.

use coordinator::domain::{Attempt, Checkpoint, DeviceKind, JobFilter, JobState, NewJob, Worker, WorkerState};
use coordinator::store::{MemStore, SqliteStore, Store};

fn new_job(name: &str) -> NewJob {
    NewJob {
        name: name.into(),
        spec_yaml: format!("name: {name}\n"),
        total_steps: 100,
        workers: 2,
        min_workers: 1,
        created_ms: 5,
    }
}

fn contract(s: &dyn Store) {
    let a = s.insert_job(new_job("a")).unwrap();
    let b = s.insert_job(new_job("b")).unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!((a.state, a.step, a.total_steps, a.checkpoint_step), (JobState::Pending, 0, 100, 0));
    let ids = |f: &JobFilter| s.list_jobs(f).unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(&JobFilter::default()), [b.id.clone(), a.id.clone()], "newest first");
    assert_eq!(ids(&JobFilter { states: vec![], limit: 1 }), [b.id.as_str()]);

    let running =
        coordinator::domain::Job { state: JobState::Running, step: 7, restarts: 1, updated_ms: 9, ..a.clone() };
    s.update_job(&running).unwrap();
    assert_eq!(s.get_job(&a.id).unwrap().unwrap(), running);
    assert_eq!(ids(&JobFilter { states: vec![JobState::Running], limit: 0 }), [a.id.as_str()]);
    assert!(s.get_job("job-999").unwrap().is_none());
    let ghost = coordinator::domain::Job { id: "job-999".into(), ..running.clone() };
    assert!(s.update_job(&ghost).is_err());

    let attempt = Attempt {
        job_id: a.id.clone(),
        attempt: 1,
        world_size: 2,
        workers: vec!["w-1".into(), "w-2".into()],
        resume_step: 0,
        started_ms: 10,
        ended_ms: None,
        outcome: String::new(),
    };
    s.put_attempt(&attempt).unwrap();
    let ended = Attempt { ended_ms: Some(20), outcome: "worker w-2 lost".into(), ..attempt.clone() };
    s.put_attempt(&ended).unwrap();
    assert_eq!(s.attempts(&a.id).unwrap(), [ended]);

    for step in [50, 100, 25] {
        let c = Checkpoint {
            job_id: a.id.clone(),
            step,
            path: format!("/ckpt/step-{step}"),
            manifest_sha256: "ab".into(),
            committed_ms: 30,
        };
        s.insert_checkpoint(&c).unwrap();
    }
    assert_eq!(s.latest_checkpoint(&a.id).unwrap().unwrap().step, 100);
    assert_eq!(s.get_job(&a.id).unwrap().unwrap().checkpoint_step, 100);
    assert!(s.latest_checkpoint(&b.id).unwrap().is_none());

    let w = Worker {
        id: "w-1".into(),
        hostname: "h".into(),
        device: DeviceKind::Cuda,
        device_index: 3,
        ring_address: String::new(),
        version: "0.1.0".into(),
        state: WorkerState::Alive,
        registered_ms: 1,
        last_seen_ms: 2,
    };
    s.put_worker(&w).unwrap();
    let dead = Worker { state: WorkerState::Dead, ..w };
    s.put_worker(&dead).unwrap();
    assert_eq!(s.workers().unwrap(), [dead]);
}

#[test]
fn memory_store_keeps_the_contract() {
    contract(&MemStore::default());
}

#[test]
fn sqlite_store_keeps_the_contract_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SqliteStore::open(dir.path()).unwrap();
        contract(&s);
        s.list_jobs(&JobFilter::default()).unwrap()
    };
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.list_jobs(&JobFilter::default()).unwrap(), before);
    assert_eq!(s.workers().unwrap().len(), 1);
    let c = s.insert_job(new_job("c")).unwrap();
    assert_eq!(c.id, "job-3", "ids continue after a reopen");
}
