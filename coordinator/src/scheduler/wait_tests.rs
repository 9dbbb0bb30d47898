//! GetAssignment's wait, on tokio's paused clock: a wake-up takes no time at all, where a
//! polling sleep would have to let the clock run.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jobspec::JobSpec;
use tokio::time::Instant;

use super::super::{NCCL_UNIQUE_ID_BYTES, Scheduler};
use crate::domain::{Clock, FakeClock};
use crate::jobs::Jobs;
use crate::store::{MemStore, Store};
use crate::workers::{Registration, Workers};

const JOB: &str = "name: t\nmodel: { init: /m }\ndata: { train: /d.jsonl }\n\
    training: { steps: 10, global_batch: 4 }\nresources: { workers: 2, device: cpu, max_restarts: 1 }\n\
    checkpoint: { dir: /c }\n";

struct Setup {
    s: Arc<Scheduler>,
    jobs: Arc<Jobs>,
    workers: Arc<Workers>,
    clock: Arc<FakeClock>,
}

fn setup() -> Setup {
    let clock = Arc::new(FakeClock::new(1000));
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let jobs = Arc::new(Jobs::new(store.clone(), dyn_clock.clone()));
    let workers = Workers::load(store.clone(), dyn_clock.clone(), Duration::from_secs(1), Duration::from_secs(60));
    let workers = Arc::new(workers.unwrap());
    let s = Scheduler::new(jobs.clone(), workers.clone(), store, dyn_clock).unwrap();
    Setup { s: Arc::new(s.with_elastic_wait(Duration::from_secs(30))), jobs, workers, clock }
}

fn reg(w: &Workers, device: jobspec::Device, port: u16) -> String {
    let r = Registration {
        hostname: "h".into(),
        device,
        device_index: 0,
        ring_address: format!("127.0.0.1:{port}"),
        version: "0".into(),
    };
    w.register(r).unwrap().id
}

fn submit(jobs: &Jobs, yaml: &str) -> String {
    jobs.submit(&JobSpec::from_str(yaml, Path::new("job_yaml")).unwrap()).unwrap().id
}

/// Lets spawned tasks run up to their next wait, without moving the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_rank_waiting_for_the_nccl_id_wakes_when_rank_0_posts_it() {
    let Setup { s, jobs, workers, .. } = setup();
    submit(&jobs, &JOB.replace("device: cpu", "device: cuda"));
    let a = reg(&workers, jobspec::Device::Cuda, 1);
    assert_eq!(s.assignment(&a).unwrap(), None, "2 workers wanted, 1 there");
    let b = reg(&workers, jobspec::Device::Cuda, 2);
    let waiter = {
        let (s, b) = (s.clone(), b.clone());
        tokio::spawn(async move { s.wait_for_assignment(&b, Duration::from_secs(5)).await })
    };
    settle().await;
    assert_eq!(s.assignment(&a).unwrap().unwrap().rank, 0, "b's wait formed the gang");
    // An odd time, so that no polling timer of any round period would be due right then.
    tokio::time::sleep(Duration::from_millis(2_003)).await;
    assert!(!waiter.is_finished(), "rank 1 waits for the id");
    let id: Vec<u8> = (0..NCCL_UNIQUE_ID_BYTES).map(|_| getrandom::u32().unwrap() as u8).collect();
    let posted = Instant::now();
    s.post_nccl_id(&a, &id).unwrap();
    let got = waiter.await.unwrap().unwrap().expect("an assignment");
    assert_eq!((got.rank, got.nccl_unique_id), (1, id));
    assert_eq!(posted.elapsed(), Duration::ZERO, "woken by the post, not by a timer");
}

#[tokio::test(start_paused = true)]
async fn a_wait_with_nothing_to_do_ends_empty_at_its_deadline() {
    let Setup { s, workers, .. } = setup();
    let a = reg(&workers, jobspec::Device::Cpu, 1);
    let started = Instant::now();
    assert_eq!(s.wait_for_assignment(&a, Duration::from_millis(1_500)).await.unwrap(), None);
    assert_eq!(started.elapsed(), Duration::from_millis(1_500));
}

/// A submitted job wakes an idle worker's wait at once, and a worker that has been waiting
/// longer than the freshness window still counts as idle and alive for a gang.
#[tokio::test(start_paused = true)]
async fn a_waiting_worker_takes_a_new_job_at_once_and_stays_eligible_while_it_waits() {
    let Setup { s, jobs, workers, clock } = setup();
    let a = reg(&workers, jobspec::Device::Cpu, 1);
    let waiter = {
        let (s, a) = (s.clone(), a.clone());
        tokio::spawn(async move { s.wait_for_assignment(&a, Duration::from_secs(5)).await })
    };
    settle().await;
    clock.advance(4_000); // past the freshness window: only the ongoing wait vouches for a
    submit(&jobs, JOB);
    let b = reg(&workers, jobspec::Device::Cpu, 2);
    let submitted = Instant::now();
    let ab = s.assignment(&b).unwrap().expect("a, waiting, joins b's gang");
    let aa = waiter.await.unwrap().unwrap().expect("a woken with its assignment");
    assert_eq!((aa.rank, ab.rank, aa.job_id == ab.job_id), (0, 1, true));
    assert_eq!(submitted.elapsed(), Duration::ZERO);

    // A one-worker job submitted during a wait starts at once.
    let c = reg(&workers, jobspec::Device::Cpu, 3);
    let waiter = {
        let (s, c) = (s.clone(), c.clone());
        tokio::spawn(async move { s.wait_for_assignment(&c, Duration::from_secs(5)).await })
    };
    settle().await;
    let since = Instant::now();
    let id = submit(&jobs, &JOB.replace("workers: 2", "workers: 1"));
    assert_eq!(waiter.await.unwrap().unwrap().unwrap().job_id, id);
    assert_eq!(since.elapsed(), Duration::ZERO);
}

/// A job that may start smaller after its elastic wait: the waiting worker wakes when that
/// wait runs out, though no event announces it.
#[tokio::test(start_paused = true)]
async fn a_wait_wakes_when_a_jobs_elastic_wait_runs_out() {
    let Setup { s, jobs, workers, clock } = setup();
    let a = reg(&workers, jobspec::Device::Cpu, 1);
    let id = submit(&jobs, &JOB.replace("workers: 2,", "workers: 2, min_workers: 1,"));
    let waiter = {
        let (s, a) = (s.clone(), a.clone());
        tokio::spawn(async move { s.wait_for_assignment(&a, Duration::from_secs(60)).await })
    };
    settle().await;
    // The FakeClock is the scheduler's; tokio's paused clock drives the sleep. Move both.
    clock.advance(30_000);
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    let got = waiter.await.unwrap().unwrap().expect("started alone after the elastic wait");
    assert_eq!((got.job_id, got.world_size), (id, 1));
}
