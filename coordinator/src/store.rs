//! Where jobs, attempts, checkpoints and workers live: the [`Store`] trait, [`SqliteStore`] (an
//! embedded SQLite database in the state directory; what the coordinator runs on) and
//! [`MemStore`] (a fake for tests of the domain logic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use jobspec::JobSpec;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, params};

use crate::domain::{
    Attempt, Checkpoint, Job, JobFilter, JobState, NewJob, Placement, Worker, WorkerState, job_number,
};
use crate::error::{Error, Result};

/// Persistent state. Every call is one transaction; callers serialise read-modify-write
/// sequences themselves.
pub trait Store: Send + Sync {
    /// Stores a new PENDING job and gives it an id (`job-N`, never reused by this store).
    fn insert_job(&self, job: NewJob) -> Result<Job>;
    fn get_job(&self, id: &str) -> Result<Option<Job>>;
    /// Newest first.
    fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        self.list_jobs_before(filter, None)
    }
    /// Newest first, only jobs whose number ([`job_number`]) is below `before` when given: the
    /// page after one that ended with job `before`.
    fn list_jobs_before(&self, filter: &JobFilter, before: Option<u64>) -> Result<Vec<Job>>;
    /// Removes a job with its attempts and checkpoint records (not the checkpoint files); false
    /// when there is no such job. Its number is not reused.
    fn delete_job(&self, id: &str) -> Result<bool>;
    /// Writes the job's mutable fields (state, step, restarts, reason, updated_ms).
    fn update_job(&self, job: &Job) -> Result<()>;
    /// Inserts or replaces (job_id, attempt).
    fn put_attempt(&self, attempt: &Attempt) -> Result<()>;
    /// A gang start: [`Store::put_attempt`] and [`Store::update_job`] in one transaction, so
    /// that both or neither are stored, at the cost of one commit (one fsync) instead of two.
    fn start_attempt(&self, job: &Job, attempt: &Attempt) -> Result<()>;
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
    updated_ms   INTEGER NOT NULL,
    device         TEXT NOT NULL CHECK (device IN ('cpu','cuda')),
    max_restarts   INTEGER NOT NULL,
    checkpoint_dir TEXT NOT NULL
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
PRAGMA user_version = 1;
";

/// `PRAGMA user_version` of [`SCHEMA`]. 0: a store from before the jobs table had the placement
/// columns (device, max_restarts, checkpoint_dir); [`migrate`] brings it up to date at open.
const SCHEMA_VERSION: i64 = 1;

const JOB_COLUMNS: &str = "id, name, spec_yaml, state, step, total_steps, restarts, reason, workers, min_workers, \
     created_ms, updated_ms, (SELECT COALESCE(MAX(c.step), 0) FROM checkpoints c WHERE c.job_id = jobs.id), \
     device, max_restarts, checkpoint_dir";

/// The tables a job store has; a database without all of them is not one.
const TABLES: [&str; 4] = ["jobs", "attempts", "checkpoints", "workers"];

/// The database file's name in the state directory.
pub const DB_FILE: &str = "coordinator.sqlite";

/// The job store on SQLite (rusqlite, bundled), in `STATE_DIR/coordinator.sqlite`.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens the database in `state_dir`, creating it (with its schema, atomically) when the
    /// file does not exist. An existing file must be a job store: a zero-length file, another
    /// database or garbage is refused, naming the file, rather than started from empty, which
    /// would reuse job ids.
    pub fn open(state_dir: &Path) -> Result<SqliteStore> {
        std::fs::create_dir_all(state_dir).map_err(|e| Error::io(state_dir.display().to_string(), e))?;
        let path = state_dir.join(DB_FILE);
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_file() => return Err(not_a_store(&path, "not a regular file")),
            Ok(m) if m.len() == 0 => return Err(not_a_store(&path, "the file is empty (0 bytes)")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_store(&path)?,
            Err(e) => return Err(Error::io(path.display().to_string(), e)),
        }
        // No CREATE: the file exists now, and must not be replaced by an empty one behind our back.
        let flags = OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_CREATE);
        let conn = Connection::open_with_flags(&path, flags).map_err(|e| open_error(&path, e))?;
        check_schema(&conn, &path)?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")
        };
        setup().map_err(|e| open_error(&path, e))?;
        migrate(&conn, &path)?;
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().map_err(|_| Error::Internal("job store lock poisoned".into()))?;
        Ok(f(&mut conn)?)
    }
}

fn not_a_store(path: &Path, why: &str) -> Error {
    Error::InvalidArgument(format!(
        "{}: not a bert2bert job store ({why}); move it away to start with no jobs, or use another --state directory",
        path.display()
    ))
}

fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) =>
        {
            not_a_store(path, &e.to_string())
        }
        _ => Error::Internal(format!("{}: {e}", path.display())),
    }
}

/// Creates an empty job store at `path`: the schema is written to a temporary file that is
/// synced and renamed into place, so a crash leaves either no file or a whole store (never the
/// zero-length file that `open` refuses).
fn create_store(path: &Path) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    for leftover in [tmp.clone(), PathBuf::from(format!("{}-journal", tmp.display()))] {
        match std::fs::remove_file(&leftover) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(leftover.display().to_string(), e)),
        }
    }
    let conn = Connection::open(&tmp).map_err(|e| open_error(&tmp, e))?;
    conn.execute_batch(SCHEMA).map_err(|e| open_error(&tmp, e))?;
    conn.close().map_err(|(_, e)| open_error(&tmp, e))?;
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(&tmp).map_err(|e| Error::io(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    sync(dir).map_err(|e| Error::io(dir.display().to_string(), e))
}

/// Every table of [`SCHEMA`] must be there; garbage fails here too (not a database).
fn check_schema(conn: &Connection, path: &Path) -> Result<()> {
    let mut stmt =
        conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").map_err(|e| open_error(path, e))?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| open_error(path, e))?;
    match TABLES.iter().find(|t| !names.iter().any(|n| n == *t)) {
        Some(missing) => Err(not_a_store(path, &format!("no `{missing}` table"))),
        None => Ok(()),
    }
}

/// The placement columns of a job, from its spec.
pub fn placement_of(spec: &JobSpec) -> Placement {
    Placement {
        device: spec.resources.device,
        max_restarts: spec.resources.max_restarts,
        checkpoint_dir: spec.checkpoint.dir.display().to_string(),
    }
}

/// Brings a store written by an older coordinator up to [`SCHEMA_VERSION`], in one transaction
/// (a crash leaves the old store, which the next open migrates again). Version 0 -> 1: the
/// placement columns, filled from each job's YAML, parsed here once. A job whose stored YAML
/// does not parse keeps defaults; if it had not ended, it fails with that reason (the scheduler
/// used to fail it the same way when it first tried to place it).
fn migrate(conn: &Connection, path: &Path) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| open_error(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(Error::FailedPrecondition(format!(
            "{}: job store schema version {version} is newer than this coordinator's ({SCHEMA_VERSION}); \
             run a newer bert2bert",
            path.display()
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let run = || -> rusqlite::Result<usize> {
        let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "ALTER TABLE jobs ADD COLUMN device TEXT NOT NULL DEFAULT 'cpu' CHECK (device IN ('cpu','cuda'));
             ALTER TABLE jobs ADD COLUMN max_restarts INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE jobs ADD COLUMN checkpoint_dir TEXT NOT NULL DEFAULT '';",
        )?;
        let rows: Vec<(String, String, String)> = {
            let mut stmt = tx.prepare("SELECT id, spec_yaml, state FROM jobs")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?
        };
        for (id, yaml, state) in &rows {
            match JobSpec::from_str(yaml, Path::new("spec_yaml")) {
                Ok(spec) => {
                    let p = placement_of(&spec);
                    tx.execute(
                        "UPDATE jobs SET device = ?2, max_restarts = ?3, checkpoint_dir = ?4 WHERE id = ?1",
                        params![id, p.device.as_str(), p.max_restarts, p.checkpoint_dir],
                    )?;
                }
                Err(e) if JobState::parse(state).is_some_and(|s| !s.is_terminal()) => {
                    let why = crate::convert::cap_reason(format!("stored job does not parse: {e}"));
                    tx.execute("UPDATE jobs SET state = 'FAILED', reason = ?2 WHERE id = ?1", params![id, why])?;
                }
                Err(_) => {}
            }
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(rows.len())
    };
    let jobs = run().map_err(|e| Error::Internal(format!("{}: upgrading the job store: {e}", path.display())))?;
    tracing::info!(store = %path.display(), jobs, "job store upgraded to schema version {SCHEMA_VERSION}");
    Ok(())
}

fn bad_column(i: usize, what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, format!("bad {what} `{v}`").into())
}

fn no_job(j: &Job) -> Error {
    Error::NotFound(format!("job_id: no job `{}`", j.id))
}

/// Writes the job's mutable fields; returns the number of rows changed (0: no such job).
fn write_job(c: &Connection, j: &Job) -> rusqlite::Result<usize> {
    c.execute(
        "UPDATE jobs SET state = ?2, step = ?3, restarts = ?4, reason = ?5, updated_ms = ?6 WHERE id = ?1",
        params![j.id, j.state.as_str(), j.step as i64, j.restarts, j.reason, j.updated_ms],
    )
}

fn write_attempt(c: &Connection, a: &Attempt) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO attempts (job_id, attempt, world_size, workers, resume_step, started_ms, ended_ms, \
         outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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
    )?;
    Ok(())
}

fn job_from_row(r: &Row) -> rusqlite::Result<Job> {
    let (state, device): (String, String) = (r.get(3)?, r.get(13)?);
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
        goodput: None,
        placement: Placement {
            device: jobspec::Device::parse(&device).ok_or_else(|| bad_column(13, "device", &device))?,
            max_restarts: r.get(14)?,
            checkpoint_dir: r.get(15)?,
        },
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
        device: jobspec::Device::parse(&device).ok_or_else(|| bad_column(2, "device", &device))?,
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
            let p = &j.placement;
            tx.execute(
                "INSERT INTO jobs (seq, id, name, spec_yaml, state, total_steps, workers, min_workers, created_ms, \
                 updated_ms, device, max_restarts, checkpoint_dir) \
                 VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11)",
                params![
                    next,
                    id,
                    j.name,
                    j.spec_yaml,
                    j.total_steps as i64,
                    j.workers,
                    j.min_workers,
                    j.created_ms,
                    p.device.as_str(),
                    p.max_restarts,
                    p.checkpoint_dir
                ],
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

    fn list_jobs_before(&self, filter: &JobFilter, before: Option<u64>) -> Result<Vec<Job>> {
        // The filter and the page run in SQL, so a page reads only its own rows. State names
        // come from the enum, not the caller, so they are safe to write into the statement.
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq < ?1");
        if !filter.states.is_empty() {
            let names: Vec<String> = filter.states.iter().map(|s| format!("'{}'", s.as_str())).collect();
            sql.push_str(&format!(" AND state IN ({})", names.join(",")));
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?2");
        let below = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = if filter.limit == 0 { -1 } else { i64::from(filter.limit) };
        self.with(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            stmt.query_map(params![below, limit], job_from_row)?.collect()
        })
    }

    fn delete_job(&self, id: &str) -> Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM checkpoints WHERE job_id = ?1", [id])?;
            tx.execute("DELETE FROM attempts WHERE job_id = ?1", [id])?;
            // AUTOINCREMENT keeps the sequence past a deleted row: the number is not reused.
            let n = tx.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn update_job(&self, j: &Job) -> Result<()> {
        if self.with(|c| write_job(c, j))? == 0 {
            return Err(no_job(j));
        }
        Ok(())
    }

    fn put_attempt(&self, a: &Attempt) -> Result<()> {
        self.with(|c| write_attempt(c, a))
    }

    fn start_attempt(&self, j: &Job, a: &Attempt) -> Result<()> {
        let found = self.with(|c| {
            let tx = c.transaction()?;
            write_attempt(&tx, a)?;
            if write_job(&tx, j)? == 0 {
                return Ok(false); // dropping `tx` rolls the attempt back
            }
            tx.commit()?;
            Ok(true)
        })?;
        if !found {
            return Err(no_job(j));
        }
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

fn filter_jobs(jobs: impl Iterator<Item = Job>, f: &JobFilter, before: Option<u64>) -> Vec<Job> {
    let limit = if f.limit == 0 { usize::MAX } else { f.limit as usize };
    let below = |j: &Job| before.is_none_or(|b| job_number(&j.id).is_some_and(|n| n < b));
    jobs.filter(|j| (f.states.is_empty() || f.states.contains(&j.state)) && below(j)).take(limit).collect()
}

/// An in-memory [`Store`] for tests: same contract, nothing on disk.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Mem>,
}

#[derive(Default)]
struct Mem {
    /// The last job number given out; deletes do not lower it.
    last_job: u64,
    jobs: Vec<Job>,
    attempts: Vec<Attempt>,
    checkpoints: Vec<Checkpoint>,
    workers: HashMap<String, Worker>,
}

impl Mem {
    fn update_job(&mut self, j: &Job) -> Result<()> {
        let x = self.jobs.iter_mut().find(|x| x.id == j.id).ok_or_else(|| no_job(j))?;
        (x.state, x.step, x.restarts, x.updated_ms) = (j.state, j.step, j.restarts, j.updated_ms);
        x.reason.clone_from(&j.reason);
        Ok(())
    }

    fn put_attempt(&mut self, a: &Attempt) {
        self.attempts.retain(|x| !(x.job_id == a.job_id && x.attempt == a.attempt));
        self.attempts.push(a.clone());
    }
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
            m.last_job += 1;
            let job = Job {
                id: format!("job-{}", m.last_job),
                name: j.name,
                spec_yaml: j.spec_yaml,
                state: JobState::Pending,
                step: 0,
                total_steps: j.total_steps,
                restarts: 0,
                reason: String::new(),
                workers: j.workers,
                min_workers: j.min_workers,
                placement: j.placement,
                checkpoint_step: 0,
                goodput: None,
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

    fn list_jobs_before(&self, filter: &JobFilter, before: Option<u64>) -> Result<Vec<Job>> {
        let ids: Vec<String> = self.with(|m| m.jobs.iter().rev().map(|j| j.id.clone()).collect())?;
        let jobs = ids.iter().filter_map(|id| self.get_job(id).transpose()).collect::<Result<Vec<_>>>()?;
        Ok(filter_jobs(jobs.into_iter(), filter, before))
    }

    fn delete_job(&self, id: &str) -> Result<bool> {
        self.with(|m| {
            let had = m.jobs.iter().any(|j| j.id == id);
            m.jobs.retain(|j| j.id != id);
            m.attempts.retain(|a| a.job_id != id);
            m.checkpoints.retain(|c| c.job_id != id);
            had
        })
    }

    fn update_job(&self, j: &Job) -> Result<()> {
        self.with(|m| m.update_job(j))?
    }

    fn put_attempt(&self, a: &Attempt) -> Result<()> {
        self.with(|m| m.put_attempt(a))
    }

    fn start_attempt(&self, j: &Job, a: &Attempt) -> Result<()> {
        // Under one lock, the job checked first: both or neither, as in SQLite.
        self.with(|m| {
            m.update_job(j)?;
            m.put_attempt(a);
            Ok(())
        })?
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
