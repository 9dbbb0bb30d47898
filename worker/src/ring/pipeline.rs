//! The ring steps of a collective, run as one pipeline each way over the two links.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::wire::{HEADER, bytes_of, bytes_of_mut, check_header, context, send_floats, shut, write_all_vectored};

const SEGMENT_BYTES: usize = 256 * 1024;
/// Most values one write of a pipeline step sends before it publishes its progress.
const SEND_FLOATS: usize = SEGMENT_BYTES / 4;
/// Pipeline steps of at most this many values run on one thread: a step is sent whole, then
/// received, since it fits in the socket buffers.
const SMALL_FLOATS: usize = 2048;

/// The two sockets of a formed ring.
pub(super) struct Links {
    right: TcpStream,
    left: TcpStream,
    /// Where a reducing step receives a segment before adding it.
    recv_buf: Vec<f32>,
    /// Every socket read and write's timeout.
    timeout: Duration,
}

impl Links {
    /// Links over the two neighbours' sockets, whose every read and write has `timeout`.
    pub(super) fn new(right: TcpStream, left: TcpStream, timeout: Duration) -> Self {
        Links { right, left, recv_buf: vec![0.0; SEGMENT_BYTES / 4], timeout }
    }

    /// `world - 1` ring steps over the chunks of `buf` dealt by `deal`: at step s this rank sends
    /// chunk `first - s` and receives chunk `first - s - 1` (mod world), adding it into its own
    /// values (`reduce`) or overwriting them. The header goes with the first step.
    pub(super) fn ring_pass(
        &mut self,
        buf: &mut [f32],
        deal: Deal,
        first: usize,
        reduce: bool,
        header: Option<&[u8; HEADER]>,
    ) -> io::Result<()> {
        let w = deal.world;
        let mode = if reduce { Mode::Add } else { Mode::Copy };
        let steps: Vec<Step> =
            (0..w - 1).map(|s| Step { send: (first + w - s) % w, recv: (first + 2 * w - s - 1) % w, mode }).collect();
        self.pipeline(buf, deal, &steps, header)
    }

    /// Run `steps` as one stream each way: step k + 1 sends the chunk step k receives (checked),
    /// and forwards each segment of it as soon as that segment has arrived (and been added),
    /// instead of waiting for the whole chunk, so consecutive steps (and the reduce-scatter and
    /// all-gather of an all-reduce) overlap along the ring. A helper thread sends while the
    /// caller's thread receives; each hands regions of `buf` to the other through a progress
    /// counter. The header goes first. Every value is still added in the same order as with
    /// one step at a time, so results are bitwise the same.
    pub(super) fn pipeline(
        &mut self,
        buf: &mut [f32],
        deal: Deal,
        steps: &[Step],
        header: Option<&[u8; HEADER]>,
    ) -> io::Result<()> {
        debug_assert!(steps.windows(2).all(|p| p[1].send == p[0].recv));
        let n = buf.len();
        let lens: Vec<usize> = steps.iter().map(|s| deal.chunk_len(n, s.recv)).collect();
        let Links { right, left, recv_buf, timeout } = self;
        let (right, left, timeout) = (&*right, &*left, *timeout);
        let plan =
            Plan { base: Base(buf.as_mut_ptr()), n, deal, steps, lens, first_len: deal.chunk_len(n, steps[0].send) };
        let sync = Progress::default();
        // Small steps fit in the socket buffers: one thread sends each step whole, then receives it.
        let small = plan.first_len.max(plan.lens.iter().copied().max().unwrap_or(0)) <= SMALL_FLOATS;
        let result = if small {
            (0..steps.len()).try_for_each(|k| {
                plan.send_step(right, k, if k == 0 { header } else { None }, &sync, None, timeout)?;
                plan.recv_step(left, k, if k == 0 { header } else { None }, recv_buf, &sync, None, timeout)
            })
        } else {
            let me = thread::current();
            thread::scope(|sc| {
                let (plan, sync) = (&plan, &sync);
                let sender = sc.spawn(move || {
                    let r = (0..steps.len()).try_for_each(|k| {
                        plan.send_step(right, k, if k == 0 { header } else { None }, sync, Some(&me), timeout)
                    });
                    if r.is_err() {
                        sync.stop.store(true, Ordering::SeqCst);
                        shut(right, left);
                    }
                    me.unpark();
                    r
                });
                let peer = sender.thread().clone();
                let received = (0..steps.len()).try_for_each(|k| {
                    plan.recv_step(left, k, if k == 0 { header } else { None }, recv_buf, sync, Some(&peer), timeout)
                });
                if received.is_err() {
                    sync.stop.store(true, Ordering::SeqCst);
                    shut(right, left);
                    peer.unpark();
                }
                let sent = sender.join().unwrap_or_else(|_| Err(io::Error::other("sender thread panicked")));
                match (sent, received) {
                    (Ok(()), Ok(())) => Ok(()),
                    (Err(e), Ok(())) => Err(context(e, "send to right")),
                    (Ok(()), Err(e)) => Err(context(e, "receive from left")),
                    (Err(s), Err(r)) => {
                        Err(io::Error::new(r.kind(), format!("send to right: {s}; receive from left: {r}")))
                    }
                }
            })
        };
        if result.is_err() {
            shut(right, left);
        }
        result
    }

    /// Chain broadcast from the root along the ring, forwarding each segment as it arrives.
    pub(super) fn broadcast(
        &mut self,
        buf: &mut [f32],
        is_root: bool,
        forward: bool,
        header: &[u8; HEADER],
    ) -> io::Result<()> {
        let Links { right, left, .. } = self;
        let (mut right, mut left) = (&*right, &*left);
        let result = if is_root {
            send_floats(right, Some(header), &[&*buf])
        } else {
            (|| {
                check_header(left, header)?;
                if forward {
                    right.write_all(header)?;
                }
                for seg in buf.chunks_mut(SEGMENT_BYTES / 4) {
                    left.read_exact(bytes_of_mut(seg))?;
                    if forward {
                        right.write_all(bytes_of(seg))?;
                    }
                }
                Ok(())
            })()
        };
        if result.is_err() {
            shut(right, left);
        }
        result
    }
}

/// What a step does with the values it receives.
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    /// Add them into this rank's.
    Add,
    /// Add them, then divide the sum by this (the last reduce-scatter step of an average).
    AddScale(f32),
    /// Overwrite this rank's.
    Copy,
}

/// One ring step: send chunk `send` to the right, receive chunk `recv` from the left.
#[derive(Clone, Copy, Debug)]
pub(super) struct Step {
    pub(super) send: usize,
    pub(super) recv: usize,
    pub(super) mode: Mode,
}

/// The buffer of a pipeline, shared by its sending and receiving threads. They only ever form
/// slices of regions the other has handed over (see `Progress`).
struct Base(*mut f32);
// SAFETY: a plain pointer into the caller's buffer, which outlives the scoped threads; access
// to its regions is handed between the threads through `Progress` (release / acquire).
unsafe impl Send for Base {}
// SAFETY: as for `Send`: the threads never touch the same region at the same time.
unsafe impl Sync for Base {}

/// How far the two threads of a pipeline have got, in values since its start: `done` counts
/// values received (and added) in place, summed over the steps; `sent` values the kernel has
/// taken from the buffer. `stop` says the other thread failed.
#[derive(Default)]
struct Progress {
    done: AtomicUsize,
    sent: AtomicUsize,
    stop: AtomicBool,
}

impl Progress {
    /// Wait until `counter` reaches `target`: the other thread (`peer`; none when one thread
    /// runs both sides, and then it always has) unparks this one whenever it moves on. The other
    /// thread's socket calls all have the timeout, so it moves on or fails within it; the limit
    /// here (twice that) is only a backstop.
    fn wait(&self, counter: &AtomicUsize, target: usize, peer: Option<&Thread>, timeout: Duration) -> io::Result<()> {
        if peer.is_none() || counter.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let deadline = Instant::now() + 2 * timeout;
        loop {
            if counter.load(Ordering::Acquire) >= target {
                return Ok(());
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(io::Error::other("stopped: the other direction failed"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the other direction made no progress"));
            }
            thread::park_timeout(deadline - now);
        }
    }
}

/// A pipeline's steps over one buffer (see `Links::pipeline`).
struct Plan<'a> {
    base: Base,
    n: usize,
    deal: Deal,
    steps: &'a [Step],
    /// Values received in each step.
    lens: Vec<usize>,
    /// Values sent in step 0 (later steps send what the step before received).
    first_len: usize,
}

impl Plan<'_> {
    /// Values received before step `k`.
    fn recv_before(&self, k: usize) -> usize {
        self.lens[..k].iter().sum()
    }

    /// Values sent before step `k`.
    fn sent_before(&self, k: usize) -> usize {
        if k == 0 { 0 } else { self.first_len + self.recv_before(k - 1) }
    }

    /// Send step `k`'s chunk, each part as soon as the receiving side has finished it.
    fn send_step(
        &self,
        s: &TcpStream,
        k: usize,
        header: Option<&[u8; HEADER]>,
        sync: &Progress,
        peer: Option<&Thread>,
        timeout: Duration,
    ) -> io::Result<()> {
        let len = if k == 0 { self.first_len } else { self.lens[k - 1] };
        let (chunk, sent0) = (self.steps[k].send, self.sent_before(k));
        let ready0 = if k == 0 { None } else { Some(self.recv_before(k - 1)) };
        let mut head = header;
        let mut pos = 0;
        while pos < len || head.is_some() {
            let mut ready = len;
            if let Some(r0) = ready0 {
                ready = sync.done.load(Ordering::Acquire).saturating_sub(r0).min(len);
                if ready == pos {
                    sync.wait(&sync.done, r0 + pos + 1, peer, timeout)?;
                    continue;
                }
            }
            let end = ready.min(pos + SEND_FLOATS);
            let mut slices: Vec<IoSlice> = head.take().map(|h| IoSlice::new(h)).into_iter().collect();
            self.deal.pieces(self.n, chunk, pos..end, |at, m| {
                // SAFETY: values [pos, end) of this chunk were handed over by the receiving side
                // (`done`), or are step 0's, which nothing writes until they are sent (the
                // receiving side waits for `sent`); the slice lives until this write returns.
                slices.push(IoSlice::new(bytes_of(unsafe { std::slice::from_raw_parts(self.base.0.add(at), m) })))
            });
            write_all_vectored(s, &mut slices)?;
            pos = end;
            sync.sent.store(sent0 + pos, Ordering::Release);
            if let Some(p) = peer {
                p.unpark();
            }
        }
        Ok(())
    }

    /// Receive step `k`'s chunk, adding or copying it into place a segment at a time, and
    /// publish each finished part to the sending side.
    #[allow(clippy::too_many_arguments)]
    fn recv_step(
        &self,
        mut s: &TcpStream,
        k: usize,
        header: Option<&[u8; HEADER]>,
        tmp: &mut [f32],
        sync: &Progress,
        peer: Option<&Thread>,
        timeout: Duration,
    ) -> io::Result<()> {
        if let Some(h) = header {
            check_header(s, h)?;
        }
        let Step { recv: chunk, mode, .. } = self.steps[k];
        let (len, done0) = (self.lens[k], self.recv_before(k));
        // The last earlier step that sent this chunk: its values must be out before ours land.
        let guard = (0..=k).rev().find(|&j| self.steps[j].send == chunk).map(|j| self.sent_before(j));
        let mut pos = 0;
        while pos < len {
            let end = len.min(pos + tmp.len());
            if let Mode::Copy = mode {
                if let Some(g) = guard {
                    sync.wait(&sync.sent, g + end, peer, timeout)?;
                }
                let mut slices: Vec<IoSliceMut> = Vec::new();
                self.deal.pieces(self.n, chunk, pos..end, |at, m| {
                    // SAFETY: this side owns values [pos, end) of the chunk: the sending side
                    // has sent them (`sent`) and sends them again only after `done` says so.
                    slices.push(IoSliceMut::new(bytes_of_mut(unsafe {
                        std::slice::from_raw_parts_mut(self.base.0.add(at), m)
                    })))
                });
                let mut rest = &mut slices[..];
                while !rest.is_empty() {
                    match s.read_vectored(rest) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(b) => IoSliceMut::advance_slices(&mut rest, b),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                sync.done.store(done0 + end, Ordering::Release);
                if let Some(p) = peer {
                    p.unpark();
                }
            } else {
                let got = &mut tmp[..end - pos];
                s.read_exact(bytes_of_mut(got))?;
                if let Some(g) = guard {
                    sync.wait(&sync.sent, g + end, peer, timeout)?;
                }
                let mut got = &got[..];
                self.deal.pieces(self.n, chunk, pos..end, |at, m| {
                    // SAFETY: as for `Mode::Copy` above.
                    let dst = unsafe { std::slice::from_raw_parts_mut(self.base.0.add(at), m) };
                    let (now, later) = got.split_at(m);
                    match mode {
                        Mode::AddScale(w) => dst.iter_mut().zip(now).for_each(|(d, v)| *d = (*d + v) / w),
                        _ => dst.iter_mut().zip(now).for_each(|(d, v)| *d += v),
                    }
                    got = later;
                });
                sync.done.store(done0 + end, Ordering::Release);
                if let Some(p) = peer {
                    p.unpark();
                }
            }
            pos = end;
        }
        Ok(())
    }
}

/// How a buffer is dealt out to the ring's `world` chunks: block j (of `block` values, the
/// last one maybe shorter) belongs to chunk j mod world.
#[derive(Clone, Copy, Debug)]
pub(super) struct Deal {
    pub(super) block: usize,
    pub(super) world: usize,
}

impl Deal {
    /// How many of a `n`-value buffer's values chunk `c` holds.
    fn chunk_len(&self, n: usize, c: usize) -> usize {
        let blocks = n.div_ceil(self.block);
        let mine = blocks.saturating_sub(c).div_ceil(self.world);
        let short = if blocks > 0 && (blocks - 1) % self.world == c { blocks * self.block - n } else { 0 };
        mine * self.block - short
    }

    /// Call `f(start, len)` for each contiguous piece of a `n`-value buffer holding values
    /// `range` of chunk `c`, in order.
    fn pieces(&self, n: usize, c: usize, range: Range<usize>, mut f: impl FnMut(usize, usize)) {
        let mut p = range.start;
        while p < range.end {
            let (i, off) = (p / self.block, p % self.block);
            let start = (c + i * self.world) * self.block;
            let m = (self.block.min(n - start) - off).min(range.end - p);
            f(start + off, m);
            p += m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deal_is_round_robin_by_block() {
        let deal = Deal { block: 2, world: 3 };
        let pieces = |c, r| {
            let mut v = Vec::new();
            deal.pieces(11, c, r, |at, m| v.push((at, m)));
            v
        };
        assert_eq!(pieces(1, 0..4), vec![(2, 2), (8, 2)]);
        assert_eq!(pieces(2, 1..3), vec![(5, 1), (10, 1)]); // blocks 2 and 5 (short)
        assert_eq!([0, 1, 2].map(|c| deal.chunk_len(11, c)), [4, 4, 3]);
        assert_eq!([0, 1, 2].map(|c| Deal { block: 4, world: 3 }.chunk_len(5, c)), [4, 1, 0]);
    }
}
