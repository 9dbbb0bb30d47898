//! Collectives across data-parallel ranks, for any backend's buffers.
//!
//! The contract (every implementation):
//! - `all_reduce_avg` leaves every rank with the element-wise mean (in place);
//! - `broadcast` copies `root`'s buffer to every rank (in place);
//! - `reduce_scatter_avg`: `send` holds `world * n` elements, rank r receives the mean of chunk r;
//! - `all_gather`: `send` holds `n`, `recv` `world * n` with rank r's data at chunk r;
//! - operations are queued in order after the work already queued on the backend, and
//!   `wait` makes later backend work wait for them, without blocking the host where the
//!   device can order it itself; so a collective's result may be read by later backend work
//!   only after `wait`, and by the host only after `wait_timeout` (NCCL writes it on its own
//!   stream);
//! - `wait_timeout` blocks the host until queued collectives finish, and aborts the communicator
//!   with an error if they don't within the limit (a dead peer must not hang a worker).

use std::time::Duration;

use crate::{Memory, Result};

pub trait Collective<B: Memory> {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn all_reduce_avg(&self, b: &B, buf: B::Mut<'_>) -> Result<()>;
    fn broadcast(&self, b: &B, buf: B::Mut<'_>, root: usize) -> Result<()>;
    fn reduce_scatter_avg(&self, b: &B, send: B::Ref<'_>, recv: B::Mut<'_>) -> Result<()>;
    fn all_gather(&self, b: &B, send: B::Ref<'_>, recv: B::Mut<'_>) -> Result<()>;
    fn wait(&self, b: &B) -> Result<()>;
    fn wait_timeout(&self, b: &B, limit: Duration) -> Result<()>;

    /// The granularity at which a bucketed all-reduce gives the same reduction order as one
    /// whole all-reduce: an all-reduce of a piece starting at a multiple of this reduces each
    /// value exactly as an all-reduce of the whole buffer would. Gradient buckets start at such
    /// multiples, so training is bitwise the same with and without them. 1: no constraint known.
    fn bucket_align(&self) -> usize {
        1
    }
}

/// World size 1: every collective is the identity (a copy where send and recv differ).
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl<B: Memory> Collective<B> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_avg(&self, _b: &B, _buf: B::Mut<'_>) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _b: &B, _buf: B::Mut<'_>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_avg(&self, b: &B, send: B::Ref<'_>, recv: B::Mut<'_>) -> Result<()> {
        b.copy(send, recv)
    }
    fn all_gather(&self, b: &B, send: B::Ref<'_>, recv: B::Mut<'_>) -> Result<()> {
        b.copy(send, recv)
    }
    fn wait(&self, _b: &B) -> Result<()> {
        Ok(())
    }
    fn wait_timeout(&self, b: &B, _limit: Duration) -> Result<()> {
        b.synchronize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn single_rank_is_identity() {
        let b = Cpu;
        let mut x: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let orig = x.clone();
        Single.all_reduce_avg(&b, &mut x[..]).unwrap();
        Single.broadcast(&b, &mut x[..], 0).unwrap();
        assert_eq!(x, orig);
        let mut y = vec![0.0; 37];
        Collective::<Cpu>::all_gather(&Single, &b, &x, &mut y).unwrap();
        assert_eq!(y, orig);
        assert!(Collective::<Cpu>::all_gather(&Single, &b, &x, &mut y[..36]).is_err());
    }
}
