//! The TCP ring collective on loopback: correctness against an f64 oracle, bitwise agreement
//! between ranks, and prompt errors (never hangs) when a peer dies, hangs or has the wrong token.

use std::net::TcpListener;
use std::sync::Barrier;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kernels::collective::Collective;
use kernels::{Cpu, rng};
use worker::ring::{BLOCK_FLOATS, RingCollective};

/// Bind one listener per rank, run `f(rank, ring)` on a thread per rank, return results by rank.
fn with_ring<R: Send>(
    world: usize,
    timeout: Duration,
    tokens: &[u64],
    f: impl Fn(usize, kernels::Result<RingCollective>) -> R + Sync,
) -> Vec<R> {
    let ls: Vec<_> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    thread::scope(|sc| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, f) = (&addrs, &f);
                let token = tokens[r % tokens.len()];
                sc.spawn(move || f(r, RingCollective::connect(r, world, token, l, addrs, timeout)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn data(seed: u64, rank: usize, n: usize) -> Vec<f32> {
    let s = rng::derive(seed, rank as u64);
    (0..n as u64).map(|i| rng::uniform(s, i) * 2.0 - 1.0).collect()
}

const T: Duration = Duration::from_secs(10);

#[test]
fn all_reduce_matches_f64_mean_and_is_bitwise_identical() {
    let seed = seed();
    eprintln!("ring test seed {seed}");
    for world in 1..=4 {
        for n in [1usize, 2, 3, 7, 4099, 1_000_003] {
            let out = with_ring(world, T, &[42], |r, ring| {
                let ring = ring.unwrap();
                let mut x = data(seed ^ n as u64, r, n);
                ring.all_reduce_avg(&Cpu, &mut x).unwrap();
                // Same inputs again: bitwise the same result.
                let mut y = data(seed ^ n as u64, r, n);
                ring.all_reduce_avg(&Cpu, &mut y).unwrap();
                assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "not deterministic");
                x
            });
            let inputs: Vec<_> = (0..world).map(|r| data(seed ^ n as u64, r, n)).collect();
            for i in 0..n {
                let mean = inputs.iter().map(|v| v[i] as f64).sum::<f64>() / world as f64;
                let scale = inputs.iter().map(|v| v[i].abs() as f64).sum::<f64>() / world as f64;
                let got = out[0][i] as f64;
                assert!((got - mean).abs() <= 1e-6 * scale.max(1e-30), "world {world} n {n} i {i}: {got} vs {mean}");
            }
            for o in &out[1..] {
                assert!(o.iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "ranks disagree");
            }
        }
    }
}

#[test]
fn broadcast_reduce_scatter_all_gather() {
    let seed = seed();
    for world in 1..=4 {
        for n in [1usize, 5, 70_001] {
            with_ring(world, T, &[7], |r, ring| {
                let ring = ring.unwrap();
                for root in 0..world {
                    let mut x = data(seed + root as u64, r, n);
                    ring.broadcast(&Cpu, &mut x, root).unwrap();
                    assert_eq!(x, data(seed + root as u64, root, n), "broadcast from {root}");
                }
                let send = data(seed, r, world * n);
                let mut recv = vec![0.0; n];
                ring.reduce_scatter_avg(&Cpu, &send, &mut recv).unwrap();
                for (i, got) in recv.iter().enumerate() {
                    let j = r * n + i;
                    let all: Vec<f64> = (0..world).map(|q| data(seed, q, world * n)[j] as f64).collect();
                    let mean = all.iter().sum::<f64>() / world as f64;
                    let scale = all.iter().map(|v| v.abs()).sum::<f64>() / world as f64;
                    assert!((*got as f64 - mean).abs() <= 1e-6 * scale, "reduce_scatter rank {r} i {i}");
                    if n > 5 {
                        break; // checking every element recomputes the inputs: a prefix is enough
                    }
                }
                let mine = data(seed ^ 1, r, n);
                let mut all = vec![0.0; world * n];
                ring.all_gather(&Cpu, &mine, &mut all).unwrap();
                for q in 0..world {
                    assert_eq!(all[q * n..(q + 1) * n], data(seed ^ 1, q, n)[..], "all_gather chunk {q}");
                }
                // Wrong shapes are errors, not panics.
                assert!(ring.all_gather(&Cpu, &mine, &mut all[1..]).is_err());
            });
        }
    }
}

#[test]
fn reduce_scatter_checks_every_element() {
    let seed = seed();
    let (world, n) = (3, 1001);
    let inputs: Vec<_> = (0..world).map(|r| data(seed, r, world * n)).collect();
    let out = with_ring(world, T, &[3], |r, ring| {
        let mut recv = vec![0.0; n];
        ring.unwrap().reduce_scatter_avg(&Cpu, &inputs[r], &mut recv).unwrap();
        recv
    });
    for (r, recv) in out.iter().enumerate() {
        for (i, got) in recv.iter().enumerate() {
            let mean = inputs.iter().map(|v| v[r * n + i] as f64).sum::<f64>() / world as f64;
            assert!((*got as f64 - mean).abs() <= 1e-6, "rank {r} i {i}");
        }
    }
}

#[test]
fn wrong_token_is_rejected_within_timeout() {
    let t = Duration::from_secs(2);
    let t0 = Instant::now();
    let res = with_ring(2, t, &[1, 2], |_, ring| ring.map(|_| ()));
    assert!(res.iter().all(|r| r.is_err()), "{res:?}");
    eprintln!("{:?}", res[0]);
    assert!(t0.elapsed() < 3 * t, "took {:?}", t0.elapsed());
}

/// A rank that drops its collective (closing its sockets) makes the others fail promptly, and
/// they then stay poisoned.
#[test]
fn dead_peer_errors_promptly() {
    let t = Duration::from_secs(2);
    let n = 4_000_000;
    let res = with_ring(3, t, &[5], |r, ring| {
        let ring = ring.unwrap();
        let mut x = vec![1.0f32; n];
        if r == 2 {
            drop(ring);
            return None;
        }
        let t0 = Instant::now();
        let err = ring.all_reduce_avg(&Cpu, &mut x).is_err();
        let elapsed = t0.elapsed();
        let t1 = Instant::now();
        let again = ring.all_reduce_avg(&Cpu, &mut x[..10]).is_err();
        Some((err, elapsed, again, t1.elapsed()))
    });
    for (err, elapsed, again, fast) in res.into_iter().flatten() {
        assert!(err && again, "a dead peer did not make the collective fail");
        assert!(elapsed < 3 * t, "took {elapsed:?}");
        assert!(fast < Duration::from_millis(100), "poisoned call took {fast:?}");
    }
}

/// A rank that aborts in the middle of a large all-reduce: every rank errors within the timeout.
#[test]
fn abort_mid_operation() {
    let t = Duration::from_secs(2);
    let n = 16 << 20;
    let res = with_ring(4, t, &[9], |r, ring| {
        let ring = ring.unwrap();
        let mut x = vec![0.5f32; n];
        let t0 = Instant::now();
        let res = if r == 1 {
            thread::scope(|sc| {
                let h = sc.spawn(|| ring.all_reduce_avg(&Cpu, &mut x));
                while !h.is_finished() && t0.elapsed() < Duration::from_millis(5) {
                    thread::yield_now();
                }
                ring.abort();
                h.join().unwrap()
            })
        } else {
            ring.all_reduce_avg(&Cpu, &mut x)
        };
        (res.is_err(), t0.elapsed())
    });
    for (r, (err, elapsed)) in res.into_iter().enumerate() {
        assert!(err, "rank {r} did not fail");
        assert!(elapsed < 3 * t, "rank {r} took {elapsed:?}");
    }
}

/// A rank that stays connected but never joins the collective: the others time out, not hang.
#[test]
fn hung_peer_times_out() {
    let t = Duration::from_secs(2);
    let barrier = Barrier::new(3);
    let (tx, rx) = mpsc::channel::<()>();
    let (tx, rx) = (std::sync::Mutex::new(tx), std::sync::Mutex::new(rx));
    let res = with_ring(3, t, &[11], |r, ring| {
        let ring = ring.unwrap();
        barrier.wait();
        if r == 0 {
            // Hold the sockets open until both others have given up.
            let _ = rx_wait(&rx, 2, 10 * t);
            return None;
        }
        let mut x = vec![1.0f32; 3_000_000];
        let t0 = Instant::now();
        let err = ring.all_reduce_avg(&Cpu, &mut x).is_err();
        let elapsed = t0.elapsed();
        let _ = tx.lock().unwrap().send(());
        Some((err, elapsed))
    });
    for (err, elapsed) in res.into_iter().flatten() {
        assert!(err, "a hung peer did not make the collective fail");
        assert!(elapsed < 3 * t, "took {elapsed:?}");
    }
}

fn rx_wait(rx: &std::sync::Mutex<mpsc::Receiver<()>>, count: usize, limit: Duration) -> usize {
    let rx = rx.lock().unwrap();
    (0..count).take_while(|_| rx.recv_timeout(limit).is_ok()).count()
}

#[test]
#[ignore = "benchmark: prints loopback throughput"]
fn bench_all_reduce_64mib() {
    let n = 16 << 20; // 64 MiB of f32
    for world in [2, 4] {
        let times = with_ring(world, Duration::from_secs(60), &[1], |r, ring| {
            let ring = ring.unwrap();
            let mut x = data(1, r, n);
            ring.all_reduce_avg(&Cpu, &mut x).unwrap(); // warm-up
            let reps = 3;
            let t0 = Instant::now();
            for _ in 0..reps {
                ring.all_reduce_avg(&Cpu, &mut x).unwrap();
            }
            t0.elapsed().as_secs_f64() / reps as f64
        });
        let s = times.iter().cloned().fold(0.0, f64::max);
        let gb = (n * 4) as f64 / 1e9;
        let bus = gb * 2.0 * (world - 1) as f64 / world as f64 / s;
        eprintln!("all_reduce 64 MiB, {world} ranks: {:.1} ms, algbw {:.2} GB/s, busbw {bus:.2} GB/s", s * 1e3, gb / s);
    }
}

/// Gradient buckets: all-reducing a buffer piece by piece, with every cut at a multiple of
/// `BLOCK_FLOATS * world`, gives bitwise the result of one all-reduce of the whole buffer (with
/// three or more ranks the order of a sum depends on where along the ring it starts).
#[test]
fn aligned_pieces_reduce_exactly_like_the_whole() {
    let seed = seed();
    eprintln!("ring pieces seed {seed}");
    for world in [2, 3, 4] {
        let align = BLOCK_FLOATS * world;
        let n = 7 * align + 123;
        // Random aligned cuts, the same on every rank.
        let mut cuts: Vec<usize> = (0..3).map(|i| (rng::mix(seed, i) as usize % 7 + 1) * align).collect();
        cuts.extend([0, n]);
        cuts.sort();
        cuts.dedup();
        let out = with_ring(world, T, &[3], |r, ring| {
            let ring = ring.unwrap();
            let mut whole = data(seed, r, n);
            let mut pieces = whole.clone();
            ring.all_reduce_avg(&Cpu, &mut whole).unwrap();
            for c in cuts.windows(2).rev() {
                ring.all_reduce_avg(&Cpu, &mut pieces[c[0]..c[1]]).unwrap();
            }
            (whole, pieces)
        });
        for (r, (whole, pieces)) in out.iter().enumerate() {
            let bad = whole.iter().zip(pieces).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(bad.is_none(), "world {world} rank {r} cuts {cuts:?}: differs at {bad:?}");
            assert!(whole.iter().zip(&out[0].0).all(|(a, b)| a.to_bits() == b.to_bits()), "ranks disagree");
        }
    }
}
