//! Where jobs, attempts, checkpoints and workers live: the [`Store`] trait, [`SqliteStore`] (an
//! embedded SQLite database in the state directory; what the coordinator runs on) and
//! [`MemStore`] (a fake for tests of the domain logic).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::domain::{Attempt, Checkpoint, DeviceKind, Job, JobFilter, JobState, NewJob, Worker, WorkerState};
use crate::error::{Error, Result};

/// Persistent state. Every call is one transaction; callers serialise read-modify-write
/// sequences themselves.
pub trait Store: Send + Sync {
    /// Stores a new PENDING job and gives it an id (`job-N`, never reused by this store).
    fn insert_job(&self, job: NewJob) -> Result<Job>;
    fn get_job(&self, id: &str) -> Result<Option<Job>>;
    /// Newest first.
    fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>>;
    /// Writes the job's mutable fields (state, step, restarts, reason, updated_ms).
    fn update_job(&self, job: &Job) -> Result<()>;
    /// Inserts or replaces (job_id, attempt).
    fn put_attempt(&self, attempt: &Attempt) -> Result<()>;
    fn attempts(&self, job_id: &str) -> Result<Vec<Attempt>>;
    fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()>;
    fn latest_checkpoint(&self, job_id: &str) -> Result<Option<Checkpoint>>;
    /// Inserts or replaces the worker by id.
    fn put_worker(&self, w: &Worker) -> Result<()>;
    fn workers(&self) -> Result<Vec<Worker>>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    spec_yaml    TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('PENDING','RUNNING','SUCCEEDED','FAILED','CANCELLED')),
    step         INTEGER NOT NULL DEFAULT 0,
    total_steps  INTEGER NOT NULL,
    restarts     INTEGER NOT NULL DEFAULT 0,
    reason       TEXT NOT NULL DEFAULT '',
    workers      INTEGER NOT NULL,
    min_workers  INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id       TEXT NOT NULL REFERENCES jobs(id),
    attempt      INTEGER NOT NULL,
    world_size   INTEGER NOT NULL,
    workers      TEXT NOT NULL,
    resume_step  INTEGER NOT NULL,
    started_ms   INTEGER NOT NULL,
    ended_ms     INTEGER,
    outcome      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id          TEXT NOT NULL REFERENCES jobs(id),
    step            INTEGER NOT NULL,
    path            TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    committed_ms    INTEGER NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS workers (
    id             TEXT PRIMARY KEY,
    hostname       TEXT NOT NULL,
    device         TEXT NOT NULL,
    device_index   INTEGER NOT NULL,
    ring_address   TEXT NOT NULL,
    version        TEXT NOT NULL,
    state          TEXT NOT NULL,
    registered_ms  INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL
);
";

const JOB_COLUMNS: &str = "id, name, spec_yaml, state, step, total_steps, restarts, reason, workers, min_workers, \
     created_ms, updated_ms, (SELECT COALESCE(MAX(c.step), 0) FROM checkpoints c WHERE c.job_id = jobs.id)";

/// The job store on SQLite (rusqlite, bundled), in `STATE_DIR/coordinator.sqlite`.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<SqliteStore> {
        std::fs::create_dir_all(state_dir).map_err(|e| Error::io(state_dir.display().to_string(), e))?;
        let conn = Connection::open(state_dir.join("coordinator.sqlite"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().map_err(|_| Error::Internal("job store lock poisoned".into()))?;
        Ok(f(&mut conn)?)
    }
}

fn bad_column(i: usize, what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, format!("bad {what} `{v}`").into())
}

fn job_from_row(r: &Row) -> rusqlite::Result<Job> {
    let state: String = r.get(3)?;
    Ok(Job {
        id: r.get(0)?,
        name: r.get(1)?,
        spec_yaml: r.get(2)?,
        state: JobState::parse(&state).ok_or_else(|| bad_column(3, "job state", &state))?,
        step: r.get::<_, i64>(4)? as u64,
        total_steps: r.get::<_, i64>(5)? as u64,
        restarts: r.get(6)?,
        reason: r.get(7)?,
        workers: r.get(8)?,
        min_workers: r.get(9)?,
        created_ms: r.get(10)?,
        updated_ms: r.get(11)?,
        checkpoint_step: r.get::<_, i64>(12)? as u64,
    })
}

fn attempt_from_row(r: &Row) -> rusqlite::Result<Attempt> {
    let workers: String = r.get(3)?;
    Ok(Attempt {
        job_id: r.get(0)?,
        attempt: r.get(1)?,
        world_size: r.get(2)?,
        workers: workers.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        resume_step: r.get::<_, i64>(4)? as u64,
        started_ms: r.get(5)?,
        ended_ms: r.get(6)?,
        outcome: r.get(7)?,
    })
}

fn checkpoint_from_row(r: &Row) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        job_id: r.get(0)?,
        step: r.get::<_, i64>(1)? as u64,
        path: r.get(2)?,
        manifest_sha256: r.get(3)?,
        committed_ms: r.get(4)?,
    })
}

fn worker_from_row(r: &Row) -> rusqlite::Result<Worker> {
    let (device, state): (String, String) = (r.get(2)?, r.get(6)?);
    Ok(Worker {
        id: r.get(0)?,
        hostname: r.get(1)?,
        device: DeviceKind::parse(&device).ok_or_else(|| bad_column(2, "device", &device))?,
        device_index: r.get(3)?,
        ring_address: r.get(4)?,
        version: r.get(5)?,
        state: WorkerState::parse(&state).ok_or_else(|| bad_column(6, "worker state", &state))?,
        registered_ms: r.get(7)?,
        last_seen_ms: r.get(8)?,
    })
}

impl Store for SqliteStore {
    fn insert_job(&self, j: NewJob) -> Result<Job> {
        let id = self.with(|c| {
            let tx = c.transaction()?;
            let next: i64 = tx.query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0) + 1",
                [],
                |r| r.get(0),
            )?;
            let id = format!("job-{next}");
            tx.execute(
                "INSERT INTO jobs (seq, id, name, spec_yaml, state, total_steps, workers, min_workers, created_ms, \
                 updated_ms) VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6, ?7, ?8, ?8)",
                params![next, id, j.name, j.spec_yaml, j.total_steps as i64, j.workers, j.min_workers, j.created_ms],
            )?;
            tx.commit()?;
            Ok(id)
        })?;
        self.get_job(&id)?.ok_or_else(|| Error::Internal(format!("{id} vanished after insert")))
    }

    fn get_job(&self, id: &str) -> Result<Option<Job>> {
        self.with(|c| {
            c.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), [id], job_from_row).optional()
        })
    }

    fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let jobs = self.with(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY seq DESC"))?;
            stmt.query_map([], job_from_row)?.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(filter_jobs(jobs.into_iter(), filter))
    }

    fn update_job(&self, j: &Job) -> Result<()> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = ?2, step = ?3, restarts = ?4, reason = ?5, updated_ms = ?6 WHERE id = ?1",
                params![j.id, j.state.as_str(), j.step as i64, j.restarts, j.reason, j.updated_ms],
            )
        })?;
        if n == 0 {
            return Err(Error::NotFound(format!("job_id: no job `{}`", j.id)));
        }
        Ok(())
    }

    fn put_attempt(&self, a: &Attempt) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO attempts (job_id, attempt, world_size, workers, resume_step, started_ms, \
                 ended_ms, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    a.job_id,
                    a.attempt,
                    a.world_size,
                    a.workers.join(","),
                    a.resume_step as i64,
                    a.started_ms,
                    a.ended_ms,
                    a.outcome
                ],
            )
        })?;
        Ok(())
    }

    fn attempts(&self, job_id: &str) -> Result<Vec<Attempt>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT job_id, attempt, world_size, workers, resume_step, started_ms, ended_ms, outcome \
                 FROM attempts WHERE job_id = ?1 ORDER BY attempt",
            )?;
            stmt.query_map([job_id], attempt_from_row)?.collect()
        })
    }

    fn insert_checkpoint(&self, k: &Checkpoint) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO checkpoints (job_id, step, path, manifest_sha256, committed_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![k.job_id, k.step as i64, k.path, k.manifest_sha256, k.committed_ms],
            )
        })?;
        Ok(())
    }

    fn latest_checkpoint(&self, job_id: &str) -> Result<Option<Checkpoint>> {
        self.with(|c| {
            c.query_row(
                "SELECT job_id, step, path, manifest_sha256, committed_ms FROM checkpoints WHERE job_id = ?1 \
                 ORDER BY step DESC LIMIT 1",
                [job_id],
                checkpoint_from_row,
            )
            .optional()
        })
    }

    fn put_worker(&self, w: &Worker) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO workers (id, hostname, device, device_index, ring_address, version, state, \
                 registered_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    w.id,
                    w.hostname,
                    w.device.as_str(),
                    w.device_index,
                    w.ring_address,
                    w.version,
                    w.state.as_str(),
                    w.registered_ms,
                    w.last_seen_ms
                ],
            )
        })?;
        Ok(())
    }

    fn workers(&self) -> Result<Vec<Worker>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, hostname, device, device_index, ring_address, version, state, registered_ms, \
                 last_seen_ms FROM workers ORDER BY registered_ms, id",
            )?;
            stmt.query_map([], worker_from_row)?.collect()
        })
    }
}

fn filter_jobs(jobs: impl Iterator<Item = Job>, f: &JobFilter) -> Vec<Job> {
    let limit = if f.limit == 0 { usize::MAX } else { f.limit as usize };
    jobs.filter(|j| f.states.is_empty() || f.states.contains(&j.state)).take(limit).collect()
}

/// An in-memory [`Store`] for tests: same contract, nothing on disk.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Mem>,
}

#[derive(Default)]
struct Mem {
    jobs: Vec<Job>,
    attempts: Vec<Attempt>,
    checkpoints: Vec<Checkpoint>,
    workers: HashMap<String, Worker>,
}

impl MemStore {
    fn with<T>(&self, f: impl FnOnce(&mut Mem) -> T) -> Result<T> {
        let mut m = self.inner.lock().map_err(|_| Error::Internal("memory store lock poisoned".into()))?;
        Ok(f(&mut m))
    }
}

impl Store for MemStore {
    fn insert_job(&self, j: NewJob) -> Result<Job> {
        self.with(|m| {
            let job = Job {
                id: format!("job-{}", m.jobs.len() + 1),
                name: j.name,
                spec_yaml: j.spec_yaml,
                state: JobState::Pending,
                step: 0,
                total_steps: j.total_steps,
                restarts: 0,
                reason: String::new(),
                workers: j.workers,
                min_workers: j.min_workers,
                checkpoint_step: 0,
                created_ms: j.created_ms,
                updated_ms: j.created_ms,
            };
            m.jobs.push(job.clone());
            job
        })
    }

    fn get_job(&self, id: &str) -> Result<Option<Job>> {
        self.with(|m| {
            let ckpt = m.checkpoints.iter().filter(|c| c.job_id == id).map(|c| c.step).max().unwrap_or(0);
            m.jobs.iter().find(|j| j.id == id).map(|j| Job { checkpoint_step: ckpt, ..j.clone() })
        })
    }

    fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let ids: Vec<String> = self.with(|m| m.jobs.iter().rev().map(|j| j.id.clone()).collect())?;
        let jobs = ids.iter().filter_map(|id| self.get_job(id).transpose()).collect::<Result<Vec<_>>>()?;
        Ok(filter_jobs(jobs.into_iter(), filter))
    }

    fn update_job(&self, j: &Job) -> Result<()> {
        self.with(|m| match m.jobs.iter_mut().find(|x| x.id == j.id) {
            Some(x) => {
                (x.state, x.step, x.restarts, x.updated_ms) = (j.state, j.step, j.restarts, j.updated_ms);
                x.reason.clone_from(&j.reason);
                Ok(())
            }
            None => Err(Error::NotFound(format!("job_id: no job `{}`", j.id))),
        })?
    }

    fn put_attempt(&self, a: &Attempt) -> Result<()> {
        self.with(|m| {
            m.attempts.retain(|x| !(x.job_id == a.job_id && x.attempt == a.attempt));
            m.attempts.push(a.clone());
        })
    }

    fn attempts(&self, job_id: &str) -> Result<Vec<Attempt>> {
        self.with(|m| {
            let mut v: Vec<_> = m.attempts.iter().filter(|a| a.job_id == job_id).cloned().collect();
            v.sort_by_key(|a| a.attempt);
            v
        })
    }

    fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        self.with(|m| {
            m.checkpoints.retain(|x| !(x.job_id == c.job_id && x.step == c.step));
            m.checkpoints.push(c.clone());
        })
    }

    fn latest_checkpoint(&self, job_id: &str) -> Result<Option<Checkpoint>> {
        self.with(|m| m.checkpoints.iter().filter(|c| c.job_id == job_id).max_by_key(|c| c.step).cloned())
    }

    fn put_worker(&self, w: &Worker) -> Result<()> {
        self.with(|m| {
            m.workers.insert(w.id.clone(), w.clone());
        })
    }

    fn workers(&self) -> Result<Vec<Worker>> {
        self.with(|m| {
            let mut v: Vec<_> = m.workers.values().cloned().collect();
            v.sort_by(|a, b| (a.registered_ms, &a.id).cmp(&(b.registered_ms, &b.id)));
            v
        })
    }
}
