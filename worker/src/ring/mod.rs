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

mod connect;
mod pipeline;
mod wire;

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kernels::collective::Collective;
use kernels::{Cpu, KernelError, Result};

use connect::{accept_left, dial_right};
use pipeline::{Deal, Links, Mode, Step};
use wire::{HEADER, Op, encode_header};

/// With three or more ranks, `all_reduce_avg` deals the buffer out to the ranks' chunks in
/// blocks of this many values, round robin. Where a value's sum starts along the ring then
/// depends only on its block's index, so an all-reduce of a piece that starts at a multiple of
/// `BLOCK_FLOATS * world` sums each value exactly as an all-reduce of the whole buffer does
/// (gradient buckets rely on this). Two ranks use contiguous halves: a sum of two terms is the
/// same in either order.
pub const BLOCK_FLOATS: usize = 1024;

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
        let links = Links::new(right, left, timeout);
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
