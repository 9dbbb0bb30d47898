//! Checking submitted job files without freezing the coordinator.
//!
//! A job file comes from any client with a token. Parsing and validating it (YAML, the path
//! policy, the model's config.json) is CPU work and file reads, so it must not run on the async
//! executor that serves every other call, heartbeats included. [`SpecGate`] runs it on tokio's
//! blocking pool, at most [`SpecGate::PARALLEL`] at a time, within a time budget:
//! - a caller that finds every slot busy waits up to [`SpecGate::QUEUE_WAIT`], then gets
//!   RESOURCE_EXHAUSTED;
//! - a check past [`SpecGate::BUDGET`] is answered INVALID_ARGUMENT naming the limit. Its thread
//!   cannot be stopped, so it keeps its slot until it ends: runaway checks can never take more
//!   than `PARALLEL` threads, and the size and depth limits (checked before parsing) bound how
//!   long one can run.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::error::{Error, Result};

pub struct SpecGate {
    slots: Arc<Semaphore>,
    parallel: usize,
    budget: Duration,
    queue_wait: Duration,
}

impl Default for SpecGate {
    fn default() -> Self {
        SpecGate::new(SpecGate::PARALLEL, SpecGate::BUDGET, SpecGate::QUEUE_WAIT)
    }
}

impl SpecGate {
    /// Job files checked at once: the rest of the coordinator keeps at least the other cores.
    pub const PARALLEL: usize = 2;
    /// The longest a job file check may take.
    pub const BUDGET: Duration = Duration::from_secs(2);
    /// How long a submit waits for a free slot.
    pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

    pub fn new(parallel: usize, budget: Duration, queue_wait: Duration) -> SpecGate {
        let parallel = parallel.max(1);
        SpecGate { slots: Arc::new(Semaphore::new(parallel)), parallel, budget, queue_wait }
    }

    /// Runs `check` on a blocking thread within the limits above; `field` names the request
    /// field in the errors.
    pub async fn run<T: Send + 'static>(
        &self,
        field: &str,
        check: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let slot = match tokio::time::timeout(self.queue_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(Error::Internal("the job check slots are closed".into())),
            Err(_) => {
                return Err(Error::ResourceExhausted(format!(
                    "{field}: the coordinator is already checking {} job files (the limit); try again shortly",
                    self.parallel
                )));
            }
        };
        let task = tokio::task::spawn_blocking(move || {
            // Held until the check really ends, even when its caller has been answered.
            let _slot = slot;
            check()
        });
        match tokio::time::timeout(self.budget, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(Error::Internal(format!("{field}: the check failed: {e}"))),
            Err(_) => Err(Error::invalid(
                field,
                format!("checking it took longer than {:?} (the limit); simplify the file", self.budget),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_checks_hit_the_budget_and_busy_slots_refuse_more() {
        let gate = Arc::new(SpecGate::new(1, Duration::from_millis(200), Duration::from_millis(100)));
        let (release, wait) = mpsc::channel::<()>();
        // A check that runs until released: over the budget, it keeps its slot.
        let e = gate
            .run("job_yaml", move || {
                let _ = wait.recv();
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.starts_with("job_yaml: ") && m.contains("200ms")), "{e}");
        let e = gate.run("job_yaml", || Ok(1)).await.unwrap_err();
        assert!(matches!(&e, Error::ResourceExhausted(m) if m.starts_with("job_yaml: ")), "{e}");
        release.send(()).unwrap();
        // The slot comes back once the runaway check ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match gate.run("job_yaml", || Ok(7)).await {
                Ok(v) => break assert_eq!(v, 7),
                Err(Error::ResourceExhausted(_)) if tokio::time::Instant::now() < deadline => {}
                Err(e) => panic!("{e}"),
            }
        }
        let e = gate.run("job_yaml", || Err::<(), _>(Error::invalid("job_yaml", "bad"))).await.unwrap_err();
        assert_eq!(e.to_string(), "job_yaml: bad");
    }
}
