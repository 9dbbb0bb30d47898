//! A CPU collective over TCP: a bandwidth-optimal ring between data-parallel ranks.
//!
//! Every rank dials its right neighbour (`(rank + 1) % world`) and accepts one connection from its
//! left neighbour, with a handshake of (magic, rank, world, token) both ways, so a stray
//! connection or one left over from an earlier attempt (another token) is turned away.
//!
//! `all_reduce_avg` splits the buffer into `world` chunks (sizes may differ by one), runs a
//! reduce-scatter of `world - 1` steps, divides each rank's finished chunk by `world`, and
//! all-gathers it in `world - 1` more. The steps run as one pipeline: a helper thread sends while
//! the caller's thread receives and adds in 256 KiB segments, and each step forwards a segment
//! of the chunk the step before received as soon as that segment is in, instead of waiting for
//! the whole chunk (so steps, and the two halves, overlap along the ring). Each chunk is summed
//! in one fixed order along the ring and then copied bit for bit, so results are deterministic
//! and identical on every rank.
//!
//! Every call starts with a header (op, root, length, sequence number) checked by the receiver,
//! so ranks that disagree on the collective fail instead of mixing data. Every socket read and
//! write has the configured timeout; any error shuts the sockets (which wakes the neighbours
//! too) and poisons the collective, so later calls fail at once. Wire floats are little-endian.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use kernels::collective::Collective;
use kernels::{Cpu, KernelError, Result};

const MAGIC_HELLO: u64 = 0x6232_6232_7269_6e67; // "b2b2ring"
const MAGIC_ACK: u64 = 0x6232_6232_6163_6b21; // "b2b2ack!"
const HELLO: usize = 32;
const HEADER: usize = 24;
const SEGMENT_BYTES: usize = 256 * 1024;
/// Most values one write of a pipeline step sends before it publishes its progress.
const SEND_FLOATS: usize = SEGMENT_BYTES / 4;
/// Pipeline steps of at most this many values run on one thread: a step is sent whole, then
/// received, since it fits in the socket buffers.
const SMALL_FLOATS: usize = 2048;
/// With three or more ranks, `all_reduce_avg` deals the buffer out to the ranks' chunks in
/// blocks of this many values, round robin. Where a value's sum starts along the ring then
/// depends only on its block's index, so an all-reduce of a piece that starts at a multiple of
/// `BLOCK_FLOATS * world` sums each value exactly as an all-reduce of the whole buffer does
/// (gradient buckets rely on this). Two ranks use contiguous halves: a sum of two terms is the
/// same in either order.
pub const BLOCK_FLOATS: usize = 1024;
/// Most buffers one vectored read or write hands the kernel (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;

// Floats go on the wire in memory order, and the wire format is little-endian.
#[cfg(target_endian = "big")]
compile_error!("worker::ring assumes a little-endian host");

#[derive(Clone, Copy, Debug)]
#[rustfmt::skip]
enum Op { AllReduce = 1, Broadcast = 2, ReduceScatter = 3, AllGather = 4 }

/// A ring collective over TCP for the CPU backend. See the module docs.
pub struct RingCollective {
    rank: usize,
    world: usize,
    state: Mutex<State>,
    poisoned: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Clones of the two sockets, so `abort` can shut them while a collective runs.
    handles: Vec<TcpStream>,
}

struct State {
    links: Option<Links>,
    seq: u64,
}

struct Links {
    right: TcpStream,
    left: TcpStream,
    /// Where a reducing step receives a segment before adding it.
    recv_buf: Vec<f32>,
    /// Every socket read and write's timeout.
    timeout: Duration,
}

impl RingCollective {
    /// Join the ring as `rank` of `world`. `listener` is this rank's bound listener, `peers[r]`
    /// rank r's listen address, and `token` names the job attempt (all ranks must agree). Gives up
    /// with an error if the ring is not formed within `timeout`, which also bounds every later
    /// socket read and write: it must exceed how long one rank may reach a collective after its
    /// neighbours (compute imbalance), or a slow rank reads as a dead one.
    pub fn connect(
        rank: usize,
        world: usize,
        token: u64,
        listener: TcpListener,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Self> {
        let bad = |what: String| Err(KernelError::Shape { op: "RingCollective::connect", what });
        if world == 0 || rank >= world {
            return bad(format!("rank {rank} out of world {world}"));
        }
        if peers.len() != world {
            return bad(format!("{} peer addresses for world {world}", peers.len()));
        }
        if timeout.is_zero() {
            return bad("zero timeout".into());
        }
        let mut me = Self {
            rank,
            world,
            state: Mutex::new(State { links: None, seq: 0 }),
            poisoned: AtomicBool::new(false),
            failure: Mutex::new(None),
            handles: Vec::new(),
        };
        if world == 1 {
            return Ok(me);
        }
        let (right_rank, left_rank) = ((rank + 1) % world, (rank + world - 1) % world);
        let deadline = Instant::now() + timeout;
        let stop = AtomicBool::new(false);
        let (right, left) = thread::scope(|sc| {
            let acceptor = sc.spawn(|| {
                let r = accept_left(&listener, [rank, world, left_rank], token, deadline, &stop);
                if r.is_err() {
                    stop.store(true, Ordering::SeqCst);
                }
                r
            });
            let right = dial_right(peers[right_rank], [rank, world, right_rank], token, deadline, &stop);
            if right.is_err() {
                stop.store(true, Ordering::SeqCst);
            }
            let left = acceptor.join().unwrap_or_else(|_| Err(io::Error::other("accept thread panicked")));
            (right, left)
        });
        let fail =
            |side: &str, e: io::Error| KernelError::Unavailable(format!("ring rank {rank}/{world}: {side}: {e}"));
        let right = right.map_err(|e| fail(&format!("connect to right neighbour rank {right_rank}"), e))?;
        let left = left.map_err(|e| fail(&format!("accept from left neighbour rank {left_rank}"), e))?;
        let setup = |s: &TcpStream| -> io::Result<TcpStream> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.try_clone()
        };
        let handles = [setup(&right), setup(&left)].into_iter().collect::<io::Result<Vec<_>>>();
        me.handles = handles.map_err(|e| fail("socket setup", e))?;
        let links = Links { right, left, recv_buf: vec![0.0; SEGMENT_BYTES / 4], timeout };
        me.state = Mutex::new(State { links: Some(links), seq: 0 });
        Ok(me)
    }

    /// Poison the collective and shut its sockets: a collective running on another thread, and
    /// the neighbours, fail promptly instead of waiting for the timeout.
    pub fn abort(&self) {
        self.poison("aborted");
    }

    /// Whether an earlier error (or `abort`) has made the collective unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    fn poison(&self, why: &str) {
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some(why.to_string());
        }
        self.poisoned.store(true, Ordering::SeqCst);
        for h in &self.handles {
            let _ = h.shutdown(Shutdown::Both);
        }
    }

    fn error(&self, op: Op, what: impl std::fmt::Display) -> KernelError {
        KernelError::Device(format!("ring rank {}/{}: {op:?}: {what}", self.rank, self.world))
    }

    /// Run one collective on the links: checks the poison flag, numbers the call, and poisons the
    /// collective if anything fails.
    fn run(
        &self,
        op: Op,
        aux: usize,
        len: usize,
        f: impl FnOnce(&mut Links, &[u8; HEADER]) -> io::Result<()>,
    ) -> Result<()> {
        if self.is_poisoned() {
            let why = self.failure.lock().ok().and_then(|f| f.clone()).unwrap_or_default();
            return Err(self.error(op, format_args!("poisoned by an earlier error: {why}")));
        }
        let mut st = match self.state.lock() {
            Ok(st) => st,
            Err(_) => {
                self.poison("a collective panicked");
                return Err(self.error(op, "state lock poisoned"));
            }
        };
        st.seq += 1;
        let header = encode_header(op, aux, len, st.seq);
        let Some(links) = st.links.as_mut() else { return Ok(()) };
        f(links, &header).map_err(|e| {
            let err = self.error(op, &e);
            self.poison(&err.to_string());
            err
        })
    }

    fn shape(&self, op: Op, what: String) -> Result<()> {
        let err = KernelError::Shape { op: "RingCollective", what: format!("{op:?}: {what}") };
        if self.world > 1 {
            self.poison(&err.to_string());
        }
        Err(err)
    }
}

impl Collective<Cpu> for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_avg(&self, _b: &Cpu, buf: &mut [f32]) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        if w == 1 || buf.is_empty() {
            return self.run(Op::AllReduce, 0, buf.len(), |_, _| Ok(()));
        }
        self.run(Op::AllReduce, 0, buf.len(), |l, h| {
            let block = if w == 2 { buf.len().div_ceil(2) } else { BLOCK_FLOATS };
            // Reduce-scatter (the last step divides this rank's finished chunk, `r + 1`, by
            // `w`), then all-gather from it, as one pipeline.
            let scale = Mode::AddScale(w as f32);
            let steps: Vec<Step> = (0..2 * (w - 1))
                .map(|k| {
                    let (first, s) = if k < w - 1 { (r, k) } else { ((r + 1) % w, k - (w - 1)) };
                    let mode = if k + 1 < w - 1 {
                        Mode::Add
                    } else if k + 1 == w - 1 {
                        scale
                    } else {
                        Mode::Copy
                    };
                    Step { send: (first + w - s) % w, recv: (first + 2 * w - s - 1) % w, mode }
                })
                .collect();
            l.pipeline(buf, Deal { block, world: w }, &steps, Some(h))
        })
    }

    fn broadcast(&self, _b: &Cpu, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            return self.shape(Op::Broadcast, format!("root {root} out of world {}", self.world));
        }
        if self.world == 1 || buf.is_empty() {
            return self.run(Op::Broadcast, root, buf.len(), |_, _| Ok(()));
        }
        let (r, w) = (self.rank, self.world);
        self.run(Op::Broadcast, root, buf.len(), |l, h| l.broadcast(buf, r == root, (r + 1) % w != root, h))
    }

    fn reduce_scatter_avg(&self, _b: &Cpu, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let (r, w, n) = (self.rank, self.world, recv.len());
        if send.len() != w * n {
            return self.shape(Op::ReduceScatter, format!("send {} != world {w} * recv {n}", send.len()));
        }
        if w == 1 || n == 0 {
            recv.copy_from_slice(send);
            return self.run(Op::ReduceScatter, 0, n, |_, _| Ok(()));
        }
        self.run(Op::ReduceScatter, 0, n, |l, h| {
            let mut work = send.to_vec();
            l.ring_pass(&mut work, Deal { block: n, world: w }, (r + w - 1) % w, true, Some(h))?;
            let scale = w as f32;
            recv.iter_mut().zip(&work[r * n..(r + 1) * n]).for_each(|(d, s)| *d = *s / scale);
            Ok(())
        })
    }

    fn all_gather(&self, _b: &Cpu, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let (r, w, n) = (self.rank, self.world, send.len());
        if recv.len() != w * n {
            return self.shape(Op::AllGather, format!("recv {} != world {w} * send {n}", recv.len()));
        }
        recv[r * n..(r + 1) * n].copy_from_slice(send);
        if w == 1 || n == 0 {
            return self.run(Op::AllGather, 0, n, |_, _| Ok(()));
        }
        self.run(Op::AllGather, 0, n, |l, h| l.ring_pass(recv, Deal { block: n, world: w }, r, false, Some(h)))
    }

    fn wait(&self, _b: &Cpu) -> Result<()> {
        Ok(())
    }

    fn wait_timeout(&self, _b: &Cpu, _limit: Duration) -> Result<()> {
        Ok(())
    }

    /// Blocks are dealt round robin (see `BLOCK_FLOATS`), so pieces starting at a multiple of a
    /// full round keep every value's place along the ring.
    fn bucket_align(&self) -> usize {
        BLOCK_FLOATS * self.world
    }
}

impl Links {
    /// `world - 1` ring steps over the chunks of `buf` dealt by `deal`: at step s this rank sends
    /// chunk `first - s` and receives chunk `first - s - 1` (mod world), adding it into its own
    /// values (`reduce`) or overwriting them. The header goes with the first step.
    fn ring_pass(
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
    fn pipeline(
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
    fn broadcast(&mut self, buf: &mut [f32], is_root: bool, forward: bool, header: &[u8; HEADER]) -> io::Result<()> {
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
enum Mode {
    /// Add them into this rank's.
    Add,
    /// Add them, then divide the sum by this (the last reduce-scatter step of an average).
    AddScale(f32),
    /// Overwrite this rank's.
    Copy,
}

/// One ring step: send chunk `send` to the right, receive chunk `recv` from the left.
#[derive(Clone, Copy, Debug)]
struct Step {
    send: usize,
    recv: usize,
    mode: Mode,
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

fn shut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Send `blocks` back to back, straight from their memory (vectored writes, no copy).
fn send_floats(s: &TcpStream, header: Option<&[u8; HEADER]>, blocks: &[&[f32]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice> = header.map(|h| IoSlice::new(h)).into_iter().collect();
    slices.extend(blocks.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(bytes_of(b))));
    write_all_vectored(s, &mut slices)
}

fn write_all_vectored(s: &TcpStream, slices: &mut [IoSlice]) -> io::Result<()> {
    let mut rest = slices;
    while !rest.is_empty() {
        let k = rest.len().min(MAX_IOV);
        match (&*s).write_vectored(&rest[..k]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn bytes_of(x: &[f32]) -> &[u8] {
    // SAFETY: the view covers exactly the slice's memory for the slice's lifetime; f32 has no
    // padding and u8 no alignment requirement.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn bytes_of_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, and every bit pattern is a valid f32, so whatever is written
    // through the view leaves valid floats.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn encode_header(op: Op, aux: usize, len: usize, seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(op as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(aux as u32).to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    h[16..].copy_from_slice(&seq.to_le_bytes());
    h
}

fn check_header(mut s: &TcpStream, expect: &[u8; HEADER]) -> io::Result<()> {
    let mut got = [0u8; HEADER];
    s.read_exact(&mut got)?;
    if &got == expect {
        return Ok(());
    }
    let field = |h: &[u8; HEADER], r: Range<usize>| h[r].iter().rev().fold(0u64, |a, &b| a << 8 | b as u64);
    let show = |h: &[u8; HEADER]| {
        format!("op {} root {} len {} call #{}", field(h, 0..4), field(h, 4..8), field(h, 8..16), field(h, 16..24))
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("left neighbour is in a different collective ({}) than this rank ({})", show(&got), show(expect)),
    ))
}

/// How a buffer is dealt out to the ring's `world` chunks: block j (of `block` values, the
/// last one maybe shorter) belongs to chunk j mod world.
#[derive(Clone, Copy, Debug)]
struct Deal {
    block: usize,
    world: usize,
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

fn hello(magic: u64, rank: usize, world: usize, token: u64) -> [u8; HELLO] {
    let mut h = [0u8; HELLO];
    for (i, v) in [magic, rank as u64, world as u64, token].into_iter().enumerate() {
        h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    h
}

fn set_deadline(s: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))
}

fn timed_out(what: String, last: Option<io::Error>) -> io::Error {
    let last = last.map(|e| format!(" (last error: {e})")).unwrap_or_default();
    io::Error::new(io::ErrorKind::TimedOut, format!("{what}{last}"))
}

/// Dial the right neighbour until it accepts our hello and answers as the rank we expect.
/// `ids` is (this rank, world, right rank).
fn dial_right(
    addr: SocketAddr,
    [rank, world, right]: [usize; 3],
    token: u64,
    deadline: Instant,
    stop: &AtomicBool,
) -> io::Result<TcpStream> {
    let mut last = None;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("stopped: accepting from the left failed"));
        }
        if now >= deadline {
            return Err(timed_out(format!("no handshake with {addr} before the timeout"), last));
        }
        let attempt = TcpStream::connect_timeout(&addr, deadline - now).and_then(|mut s| {
            set_deadline(&s, deadline)?;
            s.set_nodelay(true)?;
            s.write_all(&hello(MAGIC_HELLO, rank, world, token))?;
            let mut reply = [0u8; HELLO];
            s.read_exact(&mut reply).map_err(|e| context(e, "handshake rejected or unanswered"))?;
            if reply != hello(MAGIC_ACK, right, world, token) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected handshake reply"));
            }
            Ok(s)
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Accept connections until one says hello as our left neighbour with our world and token.
/// `ids` is (this rank, world, left rank).
fn accept_left(
    listener: &TcpListener,
    [rank, world, left]: [usize; 3],
    token: u64,
    deadline: Instant,
    stop: &AtomicBool,
) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let mut last = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("stopped: connecting to the right failed"));
        }
        if Instant::now() >= deadline {
            return Err(timed_out(format!("no valid hello from rank {left} before the timeout"), last));
        }
        match listener.accept() {
            Ok((mut s, from)) => {
                let check = (|| {
                    s.set_nonblocking(false)?;
                    set_deadline(&s, deadline)?;
                    let mut got = [0u8; HELLO];
                    s.read_exact(&mut got)?;
                    if got != hello(MAGIC_HELLO, left, world, token) {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("rejected hello from {from}")));
                    }
                    s.write_all(&hello(MAGIC_ACK, rank, world, token))
                })();
                match check {
                    Ok(()) => return Ok(s),
                    Err(e) => last = Some(e), // dropping `s` closes it: the dialer sees the refusal
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                last = Some(e);
                thread::sleep(Duration::from_millis(2));
            }
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

    /// A stray connection with the wrong token reaches rank 0 first; rank 0 turns it away and
    /// still forms the ring with the real rank 1.
    #[test]
    fn stray_connection_is_rejected() {
        let ls: Vec<_> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut stray = TcpStream::connect(addrs[0]).unwrap();
        stray.write_all(&hello(MAGIC_HELLO, 1, 2, 99)).unwrap();
        let t = Duration::from_secs(5);
        let rings: Vec<_> = thread::scope(|sc| {
            let hs: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let addrs = &addrs;
                    sc.spawn(move || RingCollective::connect(r, 2, 7, l, addrs, t))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut reply = [0u8; HELLO];
        stray.set_read_timeout(Some(t)).unwrap();
        assert!(stray.read_exact(&mut reply).is_err(), "the stray connection was answered");
        assert!(rings.iter().all(|r| r.is_ok()));
    }
}
