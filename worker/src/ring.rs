//! A CPU collective over TCP: a bandwidth-optimal ring between data-parallel ranks.
//!
//! Every rank dials its right neighbour (`(rank + 1) % world`) and accepts one connection from its
//! left neighbour, with a handshake of (magic, rank, world, token) both ways, so a stray
//! connection or one left over from an earlier attempt (another token) is turned away.
//!
//! `all_reduce_avg` splits the buffer into `world` chunks (sizes may differ by one), runs a
//! reduce-scatter of `world - 1` steps, divides each rank's finished chunk by `world`, and
//! all-gathers it in `world - 1` more. In every step the chunk to send goes out from a helper
//! thread in 256 KiB segments while the caller's thread receives and adds the incoming one, so
//! sending and receiving overlap. Each chunk is summed in one fixed order along the ring and
//! then copied bit for bit, so results are deterministic and identical on every rank.
//!
//! Every call starts with a header (op, root, length, sequence number) checked by the receiver,
//! so ranks that disagree on the collective fail instead of mixing data. Every socket read and
//! write has the configured timeout; any error shuts the sockets (which wakes the neighbours
//! too) and poisons the collective, so later calls fail at once. Wire floats are little-endian.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kernels::collective::Collective;
use kernels::{Cpu, KernelError, Result};

const MAGIC_HELLO: u64 = 0x6232_6232_7269_6e67; // "b2b2ring"
const MAGIC_ACK: u64 = 0x6232_6232_6163_6b21; // "b2b2ack!"
const HELLO: usize = 32;
const HEADER: usize = 24;
const SEGMENT_BYTES: usize = 256 * 1024;
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
    /// Where `all_reduce_avg` receives a segment before adding it.
    recv_buf: Vec<f32>,
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
        let links = Links { right, left, recv_buf: vec![0.0; SEGMENT_BYTES / 4] };
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
            let deal = Deal { block, world: w };
            l.ring_pass(buf, deal, r, true, Some(h))?;
            let owned = (r + 1) % w;
            let scale = w as f32;
            deal.blocks_mut(buf, owned).for_each(|b| b.iter_mut().for_each(|v| *v /= scale));
            l.ring_pass(buf, deal, owned, false, None)
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
        for s in 0..w - 1 {
            let send = (first + w - s) % w;
            let recv = (first + 2 * w - s - 1) % w;
            self.step(buf, deal, send, recv, reduce, if s == 0 { header } else { None })?;
        }
        Ok(())
    }

    /// Send chunk `send` of `buf` to the right while receiving chunk `recv` from the left.
    fn step(
        &mut self,
        buf: &mut [f32],
        deal: Deal,
        send: usize,
        recv: usize,
        reduce: bool,
        header: Option<&[u8; HEADER]>,
    ) -> io::Result<()> {
        let (mut out, mut inp): (Vec<&[f32]>, Vec<&mut [f32]>) = (Vec::new(), Vec::new());
        for (j, block) in buf.chunks_mut(deal.block).enumerate() {
            match j % deal.world {
                c if c == send => out.push(block),
                c if c == recv => inp.push(block),
                _ => {}
            }
        }
        let Links { right, left, recv_buf } = self;
        let (right, left) = (&*right, &*left);
        let tiny = out.iter().map(|b| b.len()).sum::<usize>().min(inp.iter().map(|b| b.len()).sum()) == 0;
        let result = if tiny {
            // Nothing moves one way: no need for a second thread.
            send_floats(right, header, &out).and_then(|()| recv_floats(left, header, inp, recv_buf, reduce))
        } else {
            thread::scope(|sc| {
                let sender = sc.spawn(move || {
                    let r = send_floats(right, header, &out);
                    if r.is_err() {
                        shut(right, left);
                    }
                    r
                });
                let received = recv_floats(left, header, inp, recv_buf, reduce);
                if received.is_err() {
                    shut(right, left);
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
    let mut rest = &mut slices[..];
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

/// Receive into `blocks` back to back: added to them a segment at a time through `tmp`
/// (`reduce`), or read straight into them.
fn recv_floats(
    mut s: &TcpStream,
    header: Option<&[u8; HEADER]>,
    mut blocks: Vec<&mut [f32]>,
    tmp: &mut [f32],
    reduce: bool,
) -> io::Result<()> {
    if let Some(h) = header {
        check_header(s, h)?;
    }
    if !reduce {
        let mut slices: Vec<IoSliceMut> = blocks.iter_mut().map(|b| IoSliceMut::new(bytes_of_mut(b))).collect();
        let mut rest = &mut slices[..];
        IoSliceMut::advance_slices(&mut rest, 0); // skips empty blocks
        while !rest.is_empty() {
            let k = rest.len().min(MAX_IOV);
            match s.read_vectored(&mut rest[..k]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => IoSliceMut::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(());
    }
    let mut left: usize = blocks.iter().map(|b| b.len()).sum();
    let mut blocks = blocks.into_iter();
    let mut dst: &mut [f32] = &mut [];
    while left > 0 {
        let k = left.min(tmp.len());
        s.read_exact(bytes_of_mut(&mut tmp[..k]))?;
        let mut got = &tmp[..k];
        while !got.is_empty() {
            if dst.is_empty() {
                dst = blocks.next().unwrap_or_default();
            }
            let m = dst.len().min(got.len());
            let (now, later) = std::mem::take(&mut dst).split_at_mut(m);
            now.iter_mut().zip(&got[..m]).for_each(|(d, v)| *d += v);
            (dst, got) = (later, &got[m..]);
        }
        left -= k;
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
    fn blocks_mut<'a>(&self, buf: &'a mut [f32], chunk: usize) -> impl Iterator<Item = &'a mut [f32]> + use<'a> {
        buf.chunks_mut(self.block).skip(chunk).step_by(self.world)
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
        let mut buf: Vec<f32> = (0..11).map(|i| i as f32).collect();
        let deal = Deal { block: 2, world: 3 };
        let got: Vec<Vec<f32>> = deal.blocks_mut(&mut buf, 1).map(|b| b.to_vec()).collect();
        assert_eq!(got, vec![vec![2.0, 3.0], vec![8.0, 9.0]]);
        assert_eq!(deal.blocks_mut(&mut buf, 2).flatten().count(), 3); // blocks 2 and 5 (short)
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
