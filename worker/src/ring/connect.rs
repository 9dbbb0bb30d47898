//! Forming the ring: each rank dials its right neighbour and accepts its left one, with a
//! handshake of (magic, rank, world, token) both ways.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::wire::context;

const MAGIC_HELLO: u64 = 0x6232_6232_7269_6e67; // "b2b2ring"
const MAGIC_ACK: u64 = 0x6232_6232_6163_6b21; // "b2b2ack!"
const HELLO: usize = 32;

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
pub(super) fn dial_right(
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
pub(super) fn accept_left(
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
    use super::super::RingCollective;
    use super::*;

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
