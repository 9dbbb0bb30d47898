//! NCCL collectives for the CUDA backend, on their own stream.
//!
//! Ordering uses events, never host syncs: each collective first makes the NCCL stream wait for
//! an event recorded on the compute stream (so it sees the finished gradients); `wait` makes the
//! compute stream wait for the NCCL stream. A later change can therefore launch bucket all-reduces
//! while backward still runs. `wait_timeout` polls for completion and NCCL's async error, and
//! aborts the communicator when a peer is gone, so a worker reports the failure instead of hanging.
//!
//! Teardown: a communicator whose collectives all completed (the last `wait_timeout` succeeded and
//! nothing was queued after it) is finalized and destroyed, which flushes NCCL's work and frees
//! it in order. One that was aborted is already freed; one with work still queued or an async
//! error is aborted instead, since `ncclCommFinalize` would block on a dead peer.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nres, sys as nsys};

use super::{Cuda, DevMut, DevRef, check, dev_err};
use crate::collective::Collective;
use crate::{KernelError, Result};

/// The 128-byte NCCL unique id that rank 0 makes and the coordinator relays to every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl NcclId {
    pub fn new() -> Result<Self> {
        let id = nres::get_uniqueid().map_err(|e| KernelError::Unavailable(format!("NCCL: {e:?}")))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }
}

pub struct Nccl {
    comm: nsys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    /// Set once the communicator is freed (aborted after a timeout or an async error, or
    /// finalized and destroyed in `drop`), so it is never used or freed again.
    aborted: AtomicBool,
    /// A collective was queued after the last successful `wait_timeout`: its completion is not
    /// known, so `drop` must abort rather than finalize (finalize waits for it, maybe for ever).
    in_flight: AtomicBool,
}

// SAFETY: the communicator is used from the owning worker thread only; NCCL calls are
// serialised on `stream`.
unsafe impl Send for Nccl {}
// SAFETY: as above.
unsafe impl Sync for Nccl {}

fn nccl_err(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device(format!("NCCL: {e:?}"))
}

impl Nccl {
    /// Join the communicator `id` as `rank` of `world`, on a new stream of `cuda`'s device.
    /// Blocks until every rank has joined (NCCL's own rendezvous).
    pub fn new(cuda: &Cuda, id: NcclId, rank: usize, world: usize) -> Result<Self> {
        check("nccl", rank < world && world > 0, || format!("rank {rank} of world {world}"))?;
        let stream = cuda.stream().context().new_stream().map_err(dev_err)?;
        let uid = nsys::ncclUniqueId { internal: id.0.map(|b| b as ::core::ffi::c_char) };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success and read only then.
        unsafe { nres::comm_init_rank(comm.as_mut_ptr(), world as i32, uid, rank as i32) }.map_err(nccl_err)?;
        // SAFETY: initialised by the successful call above.
        let comm = unsafe { comm.assume_init() };
        Ok(Self { comm, stream, rank, world, aborted: false.into(), in_flight: false.into() })
    }

    /// The NCCL stream waits for everything queued so far on the compute stream.
    fn after_compute(&self, cuda: &Cuda) -> Result<()> {
        let ev = cuda.stream().record_event(None).map_err(dev_err)?;
        self.stream.wait(&ev).map_err(dev_err)
    }

    /// Every collective's preamble: refuse an aborted communicator, then order after compute.
    fn begin(&self, cuda: &Cuda) -> Result<()> {
        self.usable()?;
        self.in_flight.store(true, Ordering::SeqCst);
        self.after_compute(cuda)
    }

    fn raw(&self) -> nsys::cudaStream_t {
        self.stream.cu_stream() as _
    }

    fn usable(&self) -> Result<()> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(KernelError::Device(format!("NCCL communicator of rank {} was aborted", self.rank)));
        }
        Ok(())
    }

    fn async_error(&self) -> Result<()> {
        let mut err = nsys::ncclResult_t::ncclSuccess;
        // SAFETY: live communicator; `err` is a valid out-pointer.
        unsafe { nsys::ncclCommGetAsyncError(self.comm, &mut err) };
        if err == nsys::ncclResult_t::ncclSuccess || err == nsys::ncclResult_t::ncclInProgress {
            Ok(())
        } else {
            Err(KernelError::Device(format!("NCCL async error {err:?} on rank {}", self.rank)))
        }
    }

    /// Abort the communicator unless that was done already: frees it without waiting for peers
    /// and makes NCCL kernels stuck on a dead peer return. Exactly once, whoever calls first.
    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the communicator is live, and the flag makes this its only free.
            let _ = unsafe { nres::comm_abort(self.comm) };
        }
    }

    /// Block until everything queued on the NCCL stream so far is done. An async error or the
    /// limit passing aborts the communicator (NCCL's rule after an async error; after a timeout
    /// it unblocks the stuck kernels) and is an error, so the worker fails instead of hanging.
    fn poll(&self, limit: Duration) -> Result<()> {
        let ev = self.stream.record_event(None).map_err(dev_err)?;
        let start = Instant::now();
        loop {
            // Checked before completion too: a failed collective may still complete its event.
            if let Err(e) = self.async_error() {
                self.abort();
                return Err(e);
            }
            if ev.try_is_complete().map_err(dev_err)? {
                return Ok(());
            }
            if start.elapsed() > limit {
                self.abort();
                return Err(KernelError::Device(format!(
                    "NCCL collective on rank {} timed out after {limit:?}; communicator aborted",
                    self.rank
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if self.aborted.load(Ordering::SeqCst) {
            return; // the abort freed it
        }
        // Finalize only a communicator known to be idle and healthy: finalize waits for queued
        // work, for ever if a peer is dead, so anything else is aborted. Never both: each frees.
        if self.in_flight.load(Ordering::SeqCst) || self.async_error().is_err() {
            return self.abort();
        }
        // SAFETY: live, idle communicator, not freed yet (`aborted` is false).
        match unsafe { nres::comm_finalize(self.comm) } {
            Ok(_) => {
                self.aborted.store(true, Ordering::SeqCst);
                // SAFETY: finalized just now; destroy frees it, once.
                let _ = unsafe { nres::comm_destroy(self.comm) };
            }
            // A communicator in error must be aborted (NCCL's rule), which frees it.
            Err(_) => self.abort(),
        }
    }
}

impl Collective<Cuda> for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_avg(&self, cuda: &Cuda, buf: DevMut<'_>) -> Result<()> {
        self.begin(cuda)?;
        let p = buf.ptr as *mut c_void;
        // SAFETY: in-place all-reduce over a live exclusive view of `len` f32s.
        unsafe {
            nres::all_reduce(
                p,
                p,
                buf.len,
                nsys::ncclDataType_t::ncclFloat32,
                nsys::ncclRedOp_t::ncclAvg,
                self.comm,
                self.raw(),
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }
    fn broadcast(&self, cuda: &Cuda, buf: DevMut<'_>, root: usize) -> Result<()> {
        check("broadcast", root < self.world, || format!("root {root} of world {}", self.world))?;
        self.begin(cuda)?;
        let p = buf.ptr as *mut c_void;
        // SAFETY: in-place broadcast over a live exclusive view.
        unsafe { nres::broadcast(p, p, buf.len, nsys::ncclDataType_t::ncclFloat32, root as i32, self.comm, self.raw()) }
            .map(drop)
            .map_err(nccl_err)
    }
    fn reduce_scatter_avg(&self, cuda: &Cuda, send: DevRef<'_>, recv: DevMut<'_>) -> Result<()> {
        check("reduce_scatter", send.len == recv.len * self.world, || {
            format!("send {} recv {} world {}", send.len, recv.len, self.world)
        })?;
        self.begin(cuda)?;
        // SAFETY: send holds world*n and recv n live f32s.
        unsafe {
            nres::reduce_scatter(
                send.ptr as *const c_void,
                recv.ptr as *mut c_void,
                recv.len,
                nsys::ncclDataType_t::ncclFloat32,
                nsys::ncclRedOp_t::ncclAvg,
                self.comm,
                self.raw(),
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }
    fn all_gather(&self, cuda: &Cuda, send: DevRef<'_>, recv: DevMut<'_>) -> Result<()> {
        check("all_gather", recv.len == send.len * self.world, || {
            format!("send {} recv {} world {}", send.len, recv.len, self.world)
        })?;
        self.begin(cuda)?;
        // SAFETY: send holds n and recv world*n live f32s.
        unsafe {
            nres::all_gather(
                send.ptr as *const c_void,
                recv.ptr as *mut c_void,
                send.len,
                nsys::ncclDataType_t::ncclFloat32,
                self.comm,
                self.raw(),
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }
    fn wait(&self, cuda: &Cuda) -> Result<()> {
        let ev = self.stream.record_event(None).map_err(dev_err)?;
        cuda.stream().wait(&ev).map_err(dev_err)
    }
    fn wait_timeout(&self, _cuda: &Cuda, limit: Duration) -> Result<()> {
        self.usable()?;
        // Cleared before the event is recorded, so a collective queued meanwhile (another
        // thread) sets it again and `drop` does not finalize over it.
        self.in_flight.store(false, Ordering::SeqCst);
        let done = self.poll(limit);
        if done.is_err() {
            self.in_flight.store(true, Ordering::SeqCst);
        }
        done
    }
}
