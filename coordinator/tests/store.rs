//! The [`Store`] contract, run against SQLite and the in-memory fake alike, and SQLite's
//! persistence across reopening.

use coordinator::domain::{Attempt, Checkpoint, JobFilter, JobState, NewJob, Worker, WorkerState};
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
        device: jobspec::Device::Cuda,
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

/// Pages by job number and deletion: run on a fresh store.
fn paging_and_delete(s: &dyn Store) {
    let ids: Vec<String> = (0..7).map(|i| s.insert_job(new_job(&format!("p{i}"))).unwrap().id).collect();
    let numbers: Vec<u64> = ids.iter().map(|id| coordinator::domain::job_number(id).unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "numbers grow: {ids:?}");
    let page = |limit, before| {
        let f = JobFilter { states: vec![], limit };
        s.list_jobs_before(&f, before).unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>()
    };
    assert_eq!(page(3, None), [ids[6].as_str(), &ids[5], &ids[4]]);
    assert_eq!(page(3, Some(numbers[4])), [ids[3].as_str(), &ids[2], &ids[1]]);
    assert_eq!(page(3, Some(numbers[1])), [ids[0].as_str()]);
    assert!(page(3, Some(numbers[0])).is_empty());
    // The state filter and the page bound combine.
    let cancelled =
        |id: &str| coordinator::domain::Job { state: JobState::Cancelled, ..s.get_job(id).unwrap().unwrap() };
    for i in [1, 3, 5] {
        s.update_job(&cancelled(&ids[i])).unwrap();
    }
    let f = JobFilter { states: vec![JobState::Cancelled], limit: 2 };
    let got: Vec<String> = s.list_jobs_before(&f, Some(numbers[5])).unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(got, [ids[3].as_str(), &ids[1]]);

    let c = Checkpoint {
        job_id: ids[6].clone(),
        step: 4,
        path: "/c".into(),
        manifest_sha256: "ab".into(),
        committed_ms: 1,
    };
    s.insert_checkpoint(&c).unwrap();
    assert!(s.delete_job(&ids[6]).unwrap());
    assert!(!s.delete_job(&ids[6]).unwrap(), "already gone");
    assert!(s.get_job(&ids[6]).unwrap().is_none());
    assert!(s.latest_checkpoint(&ids[6]).unwrap().is_none(), "its checkpoint records go with it");
    let next = s.insert_job(new_job("after")).unwrap();
    assert!(coordinator::domain::job_number(&next.id).unwrap() > numbers[6], "{} reuses a deleted id", next.id);
}

#[test]
fn memory_store_keeps_the_contract() {
    contract(&MemStore::default());
    paging_and_delete(&MemStore::default());
}

#[test]
fn sqlite_store_pages_and_deletes_without_reusing_ids() {
    let dir = tempfile::tempdir().unwrap();
    paging_and_delete(&SqliteStore::open(dir.path()).unwrap());
    // The deleted newest job's number is not reused after a reopen either.
    let s = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.insert_job(new_job("again")).unwrap().id, "job-9");
}

/// The error of opening `state` with `content` as its database file.
fn refusal(content: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.sqlite");
    std::fs::write(&file, content).unwrap();
    let e = SqliteStore::open(dir.path()).err().expect("refused");
    let msg = e.to_string();
    assert!(matches!(e, coordinator::Error::InvalidArgument(_)), "{e:?}");
    assert!(msg.contains(&file.display().to_string()), "names the file: {msg}");
    assert_eq!(std::fs::read(&file).unwrap(), content, "left as it was");
    msg
}

#[test]
fn an_empty_garbage_or_foreign_database_file_is_refused_naming_it() {
    assert!(refusal(b"").contains("empty"), "zero-length file");
    refusal(b"this is not a database, just some text that is long enough to have a header");
    // A real SQLite database without the job tables (e.g. another program's).
    let other = tempfile::tempdir().unwrap();
    let path = other.path().join("x.sqlite");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');").unwrap();
    drop(c);
    assert!(refusal(&std::fs::read(&path).unwrap()).contains("no `jobs` table"));
}

#[test]
fn a_fresh_state_dir_gets_a_store_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("new/state");
    let s = SqliteStore::open(&state).unwrap();
    assert_eq!(s.insert_job(new_job("a")).unwrap().id, "job-1");
    drop(s);
    assert!(state.join("coordinator.sqlite").metadata().unwrap().len() > 0);
    assert!(!state.join("coordinator.sqlite.tmp").exists());
    // A leftover temporary file from a crash during creation is ignored and replaced.
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    std::fs::write(again.join("coordinator.sqlite.tmp"), b"half written").unwrap();
    SqliteStore::open(&again).unwrap();
    assert!(!again.join("coordinator.sqlite.tmp").exists());
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
