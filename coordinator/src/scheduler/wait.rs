//! GetAssignment's long poll: a worker's call waits for the scheduler to wake it (a gang
//! started or ended, rank 0 posted its NCCL id, a job joined the queue) or for the one change
//! that no event announces (a job's elastic wait running out), never longer than its deadline.

use std::time::Duration;

use tokio::time::Instant;

use super::{Assignment, Scheduler};
use crate::error::Result;

/// Marks a worker as waiting in GetAssignment for as long as it lives: such a worker counts as
/// idle and alive when gangs form, however long its wait. Dropped when the call ends (also when
/// its client goes away), which records the worker as just heard from.
struct Waiting<'a> {
    scheduler: &'a Scheduler,
    worker_id: &'a str,
}

impl<'a> Waiting<'a> {
    fn enter(scheduler: &'a Scheduler, worker_id: &'a str) -> Result<Waiting<'a>> {
        *scheduler.table()?.waiting.entry(worker_id.to_owned()).or_default() += 1;
        Ok(Waiting { scheduler, worker_id })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Ok(mut t) = self.scheduler.table() else { return };
        if let Some(n) = t.waiting.get_mut(self.worker_id) {
            *n -= 1;
            if *n == 0 {
                t.waiting.remove(self.worker_id);
            }
        }
        self.scheduler.heard(&mut t, self.worker_id);
    }
}

impl Assignment {
    /// A rank > 0 of an NCCL job before rank 0 has posted the communicator's id.
    fn lacks_nccl_id(&self) -> bool {
        self.uses_nccl && self.rank > 0 && self.nccl_unique_id.is_empty()
    }
}

impl Scheduler {
    /// The worker's assignment, waiting up to `wait` for one (and, for ranks > 0 of an NCCL
    /// job, for rank 0's id; at the deadline such an assignment is returned without it).
    /// `None` when the deadline passes with no assignment.
    pub async fn wait_for_assignment(&self, worker_id: &str, wait: Duration) -> Result<Option<Assignment>> {
        let deadline = Instant::now() + wait;
        let _waiting = Waiting::enter(self, worker_id)?;
        loop {
            // Registered before looking: a wake-up between the look and the wait is not lost.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let past = Instant::now() >= deadline;
            let (found, elastic_due) = self.look(worker_id)?;
            if let Some(a) = found
                && (!a.lacks_nccl_id() || past)
            {
                return Ok(Some(a));
            }
            if past {
                return Ok(None);
            }
            let wake = match elastic_due {
                Some(due) => {
                    let after = (due - self.clock.now_ms()).max(0) as u64;
                    deadline.min(Instant::now() + Duration::from_millis(after))
                }
                None => deadline,
            };
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod tests;
