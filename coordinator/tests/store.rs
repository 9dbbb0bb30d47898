//! The [`Store`] contract, run against SQLite and the in-memory fake alike, and SQLite's
//! persistence across reopening.

use coordinator::domain::{Attempt, Checkpoint, JobFilter, JobState, NewJob, Placement, Worker, WorkerState};
use coordinator::store::{MemStore, SqliteStore, Store};

fn new_job(name: &str) -> NewJob {
    NewJob {
        name: name.into(),
        spec_yaml: format!("name: {name}\n"),
        total_steps: 100,
        workers: 2,
        min_workers: 1,
        placement: placement(),
        created_ms: 5,
    }
}

fn placement() -> Placement {
    Placement { device: jobspec::Device::Cuda, max_restarts: 4, checkpoint_dir: "/ckpt/x".into() }
}

fn contract(s: &dyn Store) {
    let a = s.insert_job(new_job("a")).unwrap();
    let b = s.insert_job(new_job("b")).unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!((a.state, a.step, a.total_steps, a.checkpoint_step), (JobState::Pending, 0, 100, 0));
    assert_eq!(s.get_job(&a.id).unwrap().unwrap().placement, placement());
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
    assert_eq!(s.attempts(&a.id).unwrap(), std::slice::from_ref(&ended));

    // A gang start stores the attempt and the job's new state together, or neither: with the
    // job missing, the attempt (whose own insert would succeed) must not stay behind.
    let second = Attempt { attempt: 2, started_ms: 30, ..attempt.clone() };
    assert!(s.start_attempt(&ghost, &second).is_err());
    assert_eq!(s.attempts(&a.id).unwrap(), std::slice::from_ref(&ended), "the attempt was stored without its job");
    let restarted = coordinator::domain::Job { step: 8, updated_ms: 30, ..running.clone() };
    s.start_attempt(&restarted, &second).unwrap();
    assert_eq!(s.get_job(&a.id).unwrap().unwrap(), restarted);
    assert_eq!(s.attempts(&a.id).unwrap(), [ended, second]);

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

/// The jobs table as coordinators before the placement columns wrote it (schema version 0).
const VERSION_0_SCHEMA: &str = "
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    spec_yaml TEXT NOT NULL, state TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL, restarts INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    workers INTEGER NOT NULL, min_workers INTEGER NOT NULL, created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE attempts (job_id TEXT NOT NULL REFERENCES jobs(id), attempt INTEGER NOT NULL,
    world_size INTEGER NOT NULL, workers TEXT NOT NULL, resume_step INTEGER NOT NULL,
    started_ms INTEGER NOT NULL, ended_ms INTEGER, outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, attempt));
CREATE TABLE checkpoints (job_id TEXT NOT NULL REFERENCES jobs(id), step INTEGER NOT NULL,
    path TEXT NOT NULL, manifest_sha256 TEXT NOT NULL, committed_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, step));
CREATE TABLE workers (id TEXT PRIMARY KEY, hostname TEXT NOT NULL, device TEXT NOT NULL,
    device_index INTEGER NOT NULL, ring_address TEXT NOT NULL, version TEXT NOT NULL,
    state TEXT NOT NULL, registered_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL);
";

fn old_row(c: &rusqlite::Connection, id: &str, yaml: &str, state: &str) {
    c.execute(
        "INSERT INTO jobs (id, name, spec_yaml, state, total_steps, workers, min_workers, created_ms, updated_ms) \
         VALUES (?1, 'old', ?2, ?3, 10, 1, 1, 1, 1)",
        rusqlite::params![id, yaml, state],
    )
    .unwrap();
}

/// A state directory from before the placement columns opens: each job gets them from its
/// YAML, once; a job whose YAML does not parse fails if it had not ended; a store from a
/// newer coordinator is refused.
#[test]
fn an_old_store_gets_the_placement_columns_from_each_jobs_yaml_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.sqlite");
    let c = rusqlite::Connection::open(&file).unwrap();
    c.execute_batch(VERSION_0_SCHEMA).unwrap();
    let (device, restarts, ckpt) = if rand_bit() { ("cuda", 7, "/ck/a") } else { ("cpu", 2, "/elsewhere/b") };
    let yaml = format!(
        "name: t\nmodel: {{ init: /m }}\ndata: {{ train: /d.jsonl }}\ntraining: {{ steps: 10, global_batch: 4 }}\n\
         resources: {{ workers: 1, device: {device}, max_restarts: {restarts} }}\ncheckpoint: {{ dir: {ckpt} }}\n"
    );
    old_row(&c, "job-1", &yaml, "RUNNING");
    old_row(&c, "job-2", "resources: [not, a, job", "PENDING");
    old_row(&c, "job-3", "resources: [not, a, job", "SUCCEEDED");
    drop(c);

    let s = SqliteStore::open(dir.path()).unwrap();
    let good = s.get_job("job-1").unwrap().unwrap();
    let want = Placement {
        device: jobspec::Device::parse(device).unwrap(),
        max_restarts: restarts,
        checkpoint_dir: ckpt.into(),
    };
    assert_eq!((good.state, good.placement), (JobState::Running, want.clone()));
    let bad = s.get_job("job-2").unwrap().unwrap();
    assert_eq!(bad.state, JobState::Failed);
    assert!(bad.reason.contains("stored job does not parse"), "{}", bad.reason);
    assert_eq!(s.get_job("job-3").unwrap().unwrap().state, JobState::Succeeded);
    assert_eq!(s.insert_job(new_job("new")).unwrap().id, "job-4");
    drop(s);

    // Once: a reopen does not parse again (a YAML spoiled now leaves the columns as they are).
    let c = rusqlite::Connection::open(&file).unwrap();
    c.execute("UPDATE jobs SET spec_yaml = 'garbage: [' WHERE id = 'job-1'", []).unwrap();
    drop(c);
    let s = SqliteStore::open(dir.path()).unwrap();
    let again = s.get_job("job-1").unwrap().unwrap();
    assert_eq!((again.state, again.placement), (JobState::Running, want));
    drop(s);

    let c = rusqlite::Connection::open(&file).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let e = SqliteStore::open(dir.path()).err().expect("a newer store is refused");
    assert!(e.to_string().contains("version 99"), "{e}");
}

/// A coin flip from the OS, so that the migrated values are not always the same.
fn rand_bit() -> bool {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8) & 1 == 1
}
