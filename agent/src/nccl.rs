//! CUDA workers: the device is opened once when the agent starts; each attempt of a `device:
//! cuda` job builds an NCCL communicator from rank 0's unique id, which the coordinator relays
//! (rank 0 makes it and posts it in GetAssignment; the other ranks ask until their assignment
//! carries it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kernels::cuda::nccl::{Nccl, NcclId};
use model::job::JobSpec;
use proto::v1;

use crate::client::status_error;
use crate::device::{Cuda, GemmPrecision, LocalDevice};
use crate::error::{Error, Result};
use crate::{Client, Current, Me, take};

/// How long one GetAssignment of a rank > 0 may wait for the id.
const ID_POLL_MS: u32 = 2_000;

/// Opens `device` when it is a CUDA device; a machine without a driver is a usage error
/// ("no CUDA driver found; use --device cpu").
pub(crate) fn open(device: LocalDevice) -> Result<Option<(usize, Arc<Cuda>)>> {
    match device {
        LocalDevice::Cpu => Ok(None),
        // bf16 is only the initial setting: each job sets its own `training.precision` (`train`).
        LocalDevice::Cuda(gpu) => {
            Ok(Some((gpu.ordinal, Arc::new(crate::device::open_cuda(gpu, GemmPrecision::Bf16)?))))
        }
    }
}

/// What a worker registers: a CUDA worker says so, so that it is given `device: cuda` jobs only.
pub(crate) fn capabilities(cuda: Option<&(usize, Arc<Cuda>)>, cpu: v1::Capabilities) -> v1::Capabilities {
    match cuda {
        None => cpu,
        Some((index, backend)) => v1::Capabilities {
            // The deprecated text too, for coordinators that read only it.
            device: jobspec::Device::Cuda.as_str().into(),
            device_kind: v1::DeviceKind::Cuda as i32,
            device_index: *index as u32,
            device_name: kernels::Memory::name(&**backend),
            ..cpu
        },
    }
}

/// The attempt's NCCL unique id: rank 0 makes it with `make` and posts it; the other ranks wait
/// for it (at most `timeout`). Fails when the attempt ends first.
pub(crate) fn unique_id(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    me: &Me,
    asg: &v1::Assignment,
    timeout: Duration,
    make: impl FnOnce() -> Result<[u8; 128]>,
) -> Result<[u8; 128]> {
    let this_attempt = |a: &v1::Assignment| a.job_id == asg.job_id && a.attempt == asg.attempt && a.rank == asg.rank;
    let ended = || Error::failure(format!("attempt {} of {} ended before NCCL was set up", asg.attempt, asg.job_id));
    let ask = |nccl_unique_id: Vec<u8>, wait_ms: u32| {
        let req = v1::GetAssignmentRequest {
            worker_id: me.id.clone(),
            wait_ms,
            nccl_unique_id,
            worker_secret: me.secret.clone(),
            held_state: None,
        };
        rt.block_on(client.clone().get_assignment(req)).map(|r| r.into_inner().assignment).map_err(status_error)
    };
    if asg.rank == 0 {
        let id = make()?;
        return match ask(id.to_vec(), 0)? {
            Some(a) if this_attempt(&a) && a.nccl_unique_id == id => Ok(id),
            _ => Err(ended()),
        };
    }
    let deadline = Instant::now() + timeout;
    let mut known = asg.nccl_unique_id.clone();
    loop {
        if let Ok(id) = <[u8; 128]>::try_from(known.as_slice()) {
            return Ok(id);
        }
        if Instant::now() >= deadline {
            return Err(Error::failure(format!(
                "no NCCL unique id from rank 0 of {} attempt {} within {timeout:?}",
                asg.job_id, asg.attempt
            )));
        }
        let wait = deadline.saturating_duration_since(Instant::now()).as_millis().min(u128::from(ID_POLL_MS));
        match ask(Vec::new(), wait as u32)? {
            Some(a) if this_attempt(&a) => known = a.nccl_unique_id,
            _ => return Err(ended()),
        }
    }
}

/// Trains one rank of a `device: cuda` attempt over NCCL.
pub(crate) fn train(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    current: &Arc<std::sync::Mutex<Current>>,
    asg: &v1::Assignment,
    me: &Me,
    spec: JobSpec,
    timeout: Duration,
) -> Result {
    let Some((_, cuda)) = take(current, |c| c.cuda.clone()) else {
        return Err(Error::failure("a device: cuda job was assigned to a cpu worker"));
    };
    // The device is shared by the jobs this worker runs one at a time: set this job's GEMM
    // precision before any of its work is queued (cuBLAS reads it as each GEMM is queued).
    let precision = crate::device::gemm_precision(&spec);
    cuda.set_precision(precision);
    tracing::info!(job = %asg.job_id, "{precision:?} GEMMs (training.precision)");
    let id = unique_id(rt, client, me, asg, timeout, || Ok(NcclId::new()?.0))?;
    let nccl = Nccl::new(&cuda, NcclId(id), asg.rank as usize, asg.world_size as usize)?;
    // NCCL has no ring to abort: a STOP from the coordinator stops the trainer after its step.
    let halt = Arc::new(AtomicBool::new(false));
    let stop = || halt.store(true, Ordering::SeqCst);
    crate::attempt::run_trainer(rt, client, current, asg, me, (&*cuda, &nccl, spec, timeout), (&halt, &stop))
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;

    use proto::v1::job_service_client::JobServiceClient;
    use proto::v1::worker_service_client::WorkerServiceClient;

    use super::*;

    const TOKEN: &str = "t";
    const JOB: &str = "name: g\nmodel: { init: /m }\ndata: { train: /d.jsonl }\n\
        training: { steps: 10, global_batch: 4 }\nresources: { workers: 2, device: cuda }\n";

    /// Two CUDA workers of one attempt (no GPU needed: the id is made-up bytes) against an
    /// in-process coordinator.
    #[test]
    fn rank_0s_id_reaches_rank_1_through_the_coordinator() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = coordinator::Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), TOKEN);
        let running = rt.block_on(coordinator::start(config)).unwrap();
        let url = running.url();
        let client: Client = rt.block_on(async {
            let ch = crate::client::channel(&url, &Default::default()).await.unwrap();
            WorkerServiceClient::with_interceptor(ch, crate::client::bearer(Some(TOKEN.into())).unwrap())
        });
        rt.block_on(async {
            let ch = crate::client::channel(&url, &Default::default()).await.unwrap();
            let mut jobs = JobServiceClient::with_interceptor(ch, crate::client::bearer(Some(TOKEN.into())).unwrap());
            jobs.submit(v1::SubmitJobRequest { job_yaml: JOB.into() }).await.unwrap();
        });
        let mut gang = Vec::new();
        for port in [1, 2] {
            let caps = v1::Capabilities { device_kind: v1::DeviceKind::Cuda as i32, ..Default::default() };
            let reg = v1::RegisterWorkerRequest {
                capabilities: Some(caps),
                ring_address: format!("127.0.0.1:{port}"),
                ..Default::default()
            };
            let r = rt.block_on(client.clone().register(reg)).unwrap().into_inner();
            gang.push(Me { id: r.worker_id, secret: r.worker_secret });
        }
        let asgs: Vec<v1::Assignment> = gang
            .iter()
            .map(|w| {
                let req = v1::GetAssignmentRequest {
                    worker_id: w.id.clone(),
                    wait_ms: 2_000,
                    worker_secret: w.secret.clone(),
                    ..Default::default()
                };
                rt.block_on(client.clone().get_assignment(req)).unwrap().into_inner().assignment.unwrap()
            })
            .collect();
        let (r0, r1) = if asgs[0].rank == 0 { (0, 1) } else { (1, 0) };

        // Rank 1 alone gives up after its timeout.
        let e = unique_id(&rt, &client, &gang[r1], &asgs[r1], Duration::from_millis(300), || unreachable!());
        assert!(e.err().unwrap().to_string().contains("no NCCL unique id from rank 0"));

        let random = RandomState::new();
        let made: [u8; 128] = std::array::from_fn(|i| random.hash_one(i) as u8);
        let got = std::thread::scope(|s| {
            let waiter =
                s.spawn(|| unique_id(&rt, &client, &gang[r1], &asgs[r1], Duration::from_secs(20), || unreachable!()));
            let posted = unique_id(&rt, &client, &gang[r0], &asgs[r0], Duration::from_secs(20), || Ok(made));
            assert_eq!(posted.ok(), Some(made));
            waiter.join().unwrap()
        });
        assert_eq!(got.ok(), Some(made));
        rt.block_on(running.shutdown()).unwrap();
    }
}
