//! The worker registry: registration, heartbeats with a timeout, and the live set that
//! scheduling draws from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::WorkerSecrets;
use crate::domain::{Clock, Worker, WorkerState};
use crate::error::{Error, Result};
use crate::store::Store;

/// What a worker says about itself when it registers.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub hostname: String,
    pub device: jobspec::Device,
    pub device_index: u32,
    pub ring_address: String,
    pub version: String,
}

/// What a worker should do after a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Continue,
    /// Abort the current attempt.
    Stop,
    /// Unknown or dead worker: register again.
    Reregister,
}

pub struct Workers {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    live: Mutex<HashMap<String, Worker>>,
    /// Worker ids are `w-<start ms, hex>-<n>`: unique across coordinator restarts.
    epoch: i64,
    next: AtomicU64,
    /// Each worker's secret (see [`WorkerSecrets`]).
    secrets: WorkerSecrets,
}

impl Workers {
    /// Loads the workers that were alive when the coordinator last stopped and gives them a
    /// fresh timeout to heartbeat again.
    pub fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        heartbeat_interval: Duration,
        heartbeat_timeout: Duration,
    ) -> Result<Workers> {
        let now = clock.now_ms();
        let live = store
            .workers()?
            .into_iter()
            .filter(|w| w.state == WorkerState::Alive)
            .map(|w| (w.id.clone(), Worker { last_seen_ms: now, ..w }))
            .collect();
        Ok(Workers {
            store,
            clock,
            heartbeat_interval,
            heartbeat_timeout,
            live: Mutex::new(live),
            epoch: now,
            next: AtomicU64::new(1),
            secrets: WorkerSecrets::random()?,
        })
    }

    /// Uses `secrets` (the state directory's key) instead of a key that dies with the process.
    pub fn with_secrets(mut self, secrets: WorkerSecrets) -> Self {
        self.secrets = secrets;
        self
    }

    /// The secret Register hands the worker.
    pub fn secret(&self, worker_id: &str) -> String {
        self.secrets.secret(worker_id)
    }

    /// UNAUTHENTICATED unless `secret` is the one Register gave `worker_id`. A worker that is not
    /// live (dead, or never registered) but holds its secret passes: heartbeats then tell it to
    /// register again.
    pub fn authenticate(&self, worker_id: &str, secret: &str) -> Result<()> {
        self.secrets.check(worker_id, secret)
    }

    fn live(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Worker>>> {
        self.live.lock().map_err(|_| Error::Internal("worker registry lock poisoned".into()))
    }

    pub fn register(&self, r: Registration) -> Result<Worker> {
        let now = self.clock.now_ms();
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let w = Worker {
            id: format!("w-{:x}-{n}", self.epoch),
            hostname: r.hostname,
            device: r.device,
            device_index: r.device_index,
            ring_address: r.ring_address,
            version: r.version,
            state: WorkerState::Alive,
            registered_ms: now,
            last_seen_ms: now,
        };
        self.store.put_worker(&w)?;
        self.live()?.insert(w.id.clone(), w.clone());
        tracing::info!(worker = %w.id, host = %w.hostname, device = w.device.as_str(), "worker registered");
        Ok(w)
    }

    /// Records that the worker is alive. The last-seen time is kept in memory only; the
    /// database holds registrations and deaths.
    pub fn heartbeat(&self, worker_id: &str) -> Result<Command> {
        let now = self.clock.now_ms();
        Ok(match self.live()?.get_mut(worker_id) {
            Some(w) => {
                w.last_seen_ms = now;
                Command::Continue
            }
            None => Command::Reregister,
        })
    }

    /// Removes a worker that says it is leaving; `None` if it was not live.
    pub fn deregister(&self, worker_id: &str) -> Result<Option<Worker>> {
        let Some(w) = self.live()?.remove(worker_id) else { return Ok(None) };
        let w = Worker { state: WorkerState::Dead, last_seen_ms: self.clock.now_ms(), ..w };
        tracing::info!(worker = %w.id, "worker deregistered");
        self.store.put_worker(&w)?;
        Ok(Some(w))
    }

    /// Marks dead every worker silent for longer than the heartbeat timeout; returns them.
    pub fn reap(&self) -> Result<Vec<Worker>> {
        let now = self.clock.now_ms();
        let timeout = self.heartbeat_timeout.as_millis() as i64;
        let dead: Vec<Worker> = {
            let mut live = self.live()?;
            let ids: Vec<String> =
                live.values().filter(|w| now - w.last_seen_ms > timeout).map(|w| w.id.clone()).collect();
            ids.iter().filter_map(|id| live.remove(id)).map(|w| Worker { state: WorkerState::Dead, ..w }).collect()
        };
        for w in &dead {
            tracing::warn!(worker = %w.id, silent_ms = now - w.last_seen_ms, "worker lost: no heartbeat");
            self.store.put_worker(w)?;
        }
        Ok(dead)
    }

    /// The worker, if it is live.
    pub fn live_worker(&self, worker_id: &str) -> Result<Option<Worker>> {
        Ok(self.live()?.get(worker_id).cloned())
    }

    /// The live workers, oldest registration first.
    pub fn alive(&self) -> Result<Vec<Worker>> {
        let mut v: Vec<Worker> = self.live()?.values().cloned().collect();
        v.sort_by(|a, b| (a.registered_ms, &a.id).cmp(&(b.registered_ms, &b.id)));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::FakeClock;
    use crate::store::MemStore;

    fn reg() -> Registration {
        Registration {
            hostname: "h".into(),
            device: jobspec::Device::Cpu,
            device_index: 0,
            ring_address: "127.0.0.1:1".into(),
            version: "0".into(),
        }
    }

    #[test]
    fn heartbeat_timeout_marks_workers_dead() {
        let clock = Arc::new(FakeClock::new(10_000));
        let store = Arc::new(MemStore::default());
        let w = Workers::load(store.clone(), clock.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap();
        let a = w.register(reg()).unwrap();
        let b = w.register(reg()).unwrap();
        assert_ne!(a.id, b.id);
        clock.advance(4_000);
        assert_eq!(w.heartbeat(&a.id).unwrap(), Command::Continue);
        clock.advance(2_000);
        let dead = w.reap().unwrap();
        assert_eq!(dead.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [b.id.as_str()]);
        assert_eq!(w.heartbeat(&b.id).unwrap(), Command::Reregister);
        assert_eq!(w.alive().unwrap().len(), 1);
        let stored = store.workers().unwrap();
        assert_eq!(stored.iter().find(|x| x.id == b.id).unwrap().state, WorkerState::Dead);

        // A restarted registry gets the live worker back with a fresh timeout.
        let w2 = Workers::load(store, clock.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap();
        assert_eq!(w2.alive().unwrap().iter().map(|x| x.id.clone()).collect::<Vec<_>>(), [a.id.as_str()]);
        clock.advance(1);
        assert!(w2.reap().unwrap().is_empty());
    }
}
