//! Recovery from peers: a rank's training state kept in host memory when an attempt ends, and
//! its transfer to every rank of the next attempt over the collective, checked by a hash.
//!
//! Why the kept state is exact: a step changes the state (parameters, AdamW moments, step
//! count, data cursor) only after every collective of the step has completed, so when a peer
//! dies mid-step each survivor still holds the state after the last step it completed. Dropout
//! masks are keyed on (seed, step, micro-batch), so there is no RNG state to keep. The next
//! attempt starts from the newest such state among its members (the coordinator names its
//! rank, the root) instead of from the last checkpoint, and loses no step.
//!
//! The transfer: the root broadcasts a header (step, cursor, seed, length, and the SHA-256 of
//! its state, all as exact small integers in f32), then the parameters and both moments
//! straight from its device buffers. Every rank, the root too, hashes what it now holds and
//! compares it with the header; the ranks then all-reduce their mismatch flags, so that either
//! every rank goes on or every rank fails the attempt (which then falls back to the checkpoint).

use kernels::Backend;
use kernels::collective::Collective;
use model::pipeline::Cursor;
use model::{Error, Result};
use sha2::{Digest, Sha256};

/// A rank's training state after `step` completed optimiser steps, in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub step: u64,
    pub cursor: Cursor,
    pub seed: u64,
    pub params: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
}

/// The fields of the header, each a u64 sent as four 16-bit pieces (exact in f32), then the
/// 32-byte digest as sixteen 16-bit pieces.
const U64_FIELDS: usize = 5;
const HEADER_LEN: usize = U64_FIELDS * 4 + 16;

/// What the root announces before the state itself.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Header {
    step: u64,
    cursor: Cursor,
    seed: u64,
    len: u64,
    digest: [u8; 32],
}

impl Header {
    fn encode(&self) -> Vec<f32> {
        let fields = [self.step, self.cursor.epoch, self.cursor.step_in_epoch, self.seed, self.len];
        let mut out = Vec::with_capacity(HEADER_LEN);
        for f in fields {
            out.extend((0..4).map(|i| ((f >> (16 * i)) & 0xffff) as f32));
        }
        out.extend(self.digest.chunks(2).map(|p| u16::from_le_bytes([p[0], p[1]]) as f32));
        out
    }

    fn decode(v: &[f32]) -> Result<Header> {
        let piece = |x: f32| -> Result<u64> {
            if x.fract() == 0.0 && (0.0..65536.0).contains(&x) {
                Ok(x as u64)
            } else {
                Err(Error::Other(format!("peer state transfer: a header value {x} is not a 16-bit piece")))
            }
        };
        if v.len() != HEADER_LEN {
            return Err(Error::Other(format!("peer state transfer: header of {} values", v.len())));
        }
        let mut fields = [0u64; U64_FIELDS];
        for (k, f) in fields.iter_mut().enumerate() {
            for i in 0..4 {
                *f |= piece(v[4 * k + i])? << (16 * i);
            }
        }
        let mut digest = [0u8; 32];
        for (i, x) in v[U64_FIELDS * 4..].iter().enumerate() {
            digest[2 * i..2 * i + 2].copy_from_slice(&(piece(*x)? as u16).to_le_bytes());
        }
        let [step, epoch, step_in_epoch, seed, len] = fields;
        Ok(Header { step, cursor: Cursor { epoch, step_in_epoch }, seed, len, digest })
    }
}

/// SHA-256 of the state: the scalar fields, then the three vectors as little-endian f32.
pub fn digest(step: u64, cursor: Cursor, seed: u64, vectors: [&[f32]; 3]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"bert2bert peer state v1");
    for f in [step, cursor.epoch, cursor.step_in_epoch, seed, vectors[0].len() as u64] {
        h.update(f.to_le_bytes());
    }
    for v in vectors {
        // In pieces, so that no second copy of a large buffer is made.
        for chunk in v.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&bytes);
        }
    }
    h.finalize().into()
}

impl Snapshot {
    pub fn digest(&self) -> [u8; 32] {
        digest(self.step, self.cursor, self.seed, [&self.params, &self.adam_m, &self.adam_v])
    }
}

/// The three device buffers a transfer fills, each of `n` values.
pub(crate) struct StateBuffers<'s, B: Backend> {
    pub params: &'s mut B::Buf,
    pub adam_m: &'s mut B::Buf,
    pub adam_v: &'s mut B::Buf,
    pub n: usize,
}

/// What a rank holds after a transfer.
pub(crate) struct Received {
    pub step: u64,
    pub cursor: Cursor,
}

/// Runs the transfer on every rank of `coll`: `root` sends `held` (which it must have), the
/// others receive into `bufs`. Fails on every rank alike when any rank's copy does not match
/// the root's hash. `seed` is the job's: a state trained with another seed is refused.
pub(crate) fn transfer<B: Backend, C: Collective<B>>(
    b: &B,
    coll: &C,
    root: usize,
    held: Option<&Snapshot>,
    seed: u64,
    bufs: StateBuffers<'_, B>,
) -> Result<Received> {
    let (rank, n) = (coll.rank(), bufs.n);
    let mut header = vec![0f32; HEADER_LEN];
    let mut local_error = None;
    if rank == root {
        match held {
            Some(s) if s.params.len() == n && s.adam_m.len() == n && s.adam_v.len() == n => {
                let h = Header { step: s.step, cursor: s.cursor, seed: s.seed, len: n as u64, digest: s.digest() };
                header = h.encode();
                b.copy(b.view(&b.upload(&s.params)?, 0..n), b.view_mut(bufs.params, 0..n))?;
                b.copy(b.view(&b.upload(&s.adam_m)?, 0..n), b.view_mut(bufs.adam_m, 0..n))?;
                b.copy(b.view(&b.upload(&s.adam_v)?, 0..n), b.view_mut(bufs.adam_v, 0..n))?;
            }
            // Still take part, so the other ranks fail on the header instead of waiting.
            Some(s) => local_error = Some(format!("the held state has {} values, the model {n}", s.params.len())),
            None => local_error = Some("this rank was named to hand on its state but holds none".to_owned()),
        }
    }
    let mut hbuf = b.upload(&header)?;
    coll.broadcast(b, b.view_mut(&mut hbuf, 0..HEADER_LEN), root)?;
    coll.wait(b)?;
    let h = Header::decode(&b.download(b.view(&hbuf, 0..HEADER_LEN))?)?;
    if let Some(why) = local_error {
        return Err(Error::Other(format!("peer state transfer (rank {rank}): {why}")));
    }
    if h.len != n as u64 {
        return Err(Error::Other(format!("peer state transfer: rank {root} holds {} values, this model {n}", h.len)));
    }
    if h.seed != seed {
        return Err(Error::Other(format!(
            "peer state transfer: state trained with seed {}, the job says {seed}",
            h.seed
        )));
    }
    for buf in [&mut *bufs.params, &mut *bufs.adam_m, &mut *bufs.adam_v] {
        coll.broadcast(b, b.view_mut(buf, 0..n), root)?;
    }
    coll.wait(b)?;
    let got = [
        b.download(b.view(bufs.params, 0..n))?,
        b.download(b.view(bufs.adam_m, 0..n))?,
        b.download(b.view(bufs.adam_v, 0..n))?,
    ];
    let mine = digest(h.step, h.cursor, h.seed, [&got[0], &got[1], &got[2]]);
    let mismatch = if mine == h.digest { 0.0 } else { 1.0 };
    // Every rank learns whether any copy is bad, so that all fail together.
    let mut flag = b.upload(&[mismatch])?;
    coll.all_reduce_avg(b, b.view_mut(&mut flag, 0..1))?;
    coll.wait(b)?;
    let any_bad = b.download(b.view(&flag, 0..1))?[0] != 0.0;
    if any_bad {
        let whose = if mismatch != 0.0 { format!("this rank's ({rank})") } else { "another rank's".to_owned() };
        return Err(Error::Other(format!(
            "peer state transfer: {whose} copy of rank {root}'s state does not match its SHA-256; resuming from \
             the checkpoint instead"
        )));
    }
    Ok(Received { step: h.step, cursor: h.cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_every_bit() {
        let h = Header {
            step: u64::MAX - 12345,
            cursor: Cursor { epoch: 1 << 40, step_in_epoch: 65535 },
            seed: 0x0123_4567_89ab_cdef,
            len: 47_000_123,
            digest: std::array::from_fn(|i| (i * 37 + 11) as u8),
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[3] = 0.5;
        assert!(Header::decode(&bad).is_err());
        bad[3] = 70000.0;
        assert!(Header::decode(&bad).is_err());
    }

    #[test]
    fn digest_sees_every_field_and_value() {
        let s = Snapshot {
            step: 7,
            cursor: Cursor { epoch: 1, step_in_epoch: 2 },
            seed: 3,
            params: vec![1.0, -0.0, 3.5],
            adam_m: vec![0.1; 3],
            adam_v: vec![0.2; 3],
        };
        let d = s.digest();
        let mut t = s.clone();
        t.params[1] = 0.0; // -0.0 and 0.0 compare equal but are different bits
        assert_ne!(t.digest(), d);
        let mut t = s.clone();
        t.cursor.step_in_epoch = 3;
        assert_ne!(t.digest(), d);
        let mut t = s.clone();
        t.adam_v[2] = f32::from_bits(t.adam_v[2].to_bits() + 1);
        assert_ne!(t.digest(), d);
        assert_eq!(s.clone().digest(), d);
    }
}
