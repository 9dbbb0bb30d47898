//! All-reduce bandwidth of `worker::ring::RingCollective` on loopback, one thread per rank.
//!
//! `cargo run --release -p worker --example allreduce -- --ranks 2 --sizes 1,4,16,64,256 --iters 10 [--json]`
//!
//! Sizes are MiB of f32 per rank. Each timed iteration starts after a barrier; its time is the
//! slowest rank's, and a size reports the median over `--iters` (after one warm-up call), and
//! the CPU time (user + system, all ranks together) per call: on a busy machine wall times
//! swing, CPU time much less.
//! Algorithm bandwidth is bytes / time; bus bandwidth multiplies it by 2 (n - 1) / n, the share
//! of the buffer each rank sends and receives in a ring all-reduce. `bench/allreduce/run.sh`
//! compares these numbers with torch.distributed's gloo backend.

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kernels::Cpu;
use kernels::collective::Collective;
use worker::ring::RingCollective;

struct Args {
    ranks: usize,
    sizes_mib: Vec<usize>,
    iters: usize,
    json: bool,
}

const USAGE: &str = "usage: allreduce [--ranks N] [--sizes MIB,MIB,..] [--iters N] [--json]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args { ranks: 2, sizes_mib: vec![1, 4, 16, 64, 256], iters: 10, json: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |s: &str, what: &str| -> Result<usize, String> {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{what}: `{s}` is not a positive integer"))
        };
        match flag.as_str() {
            "--ranks" => a.ranks = number(&value()?, "--ranks")?,
            "--iters" => a.iters = number(&value()?, "--iters")?,
            "--sizes" => a.sizes_mib = value()?.split(',').map(|s| number(s, "--sizes")).collect::<Result<_, _>>()?,
            "--json" => a.json = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

/// User + system CPU seconds of this process so far (every rank's thread).
fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF cannot fail.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Median seconds per all-reduce of `n` floats over `ranks` ring ranks (slowest rank per
/// iteration), and CPU seconds per all-reduce (all ranks).
fn measure(ranks: usize, n: usize, iters: usize) -> Result<(f64, f64), String> {
    let listeners: Vec<_> = (0..ranks)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}")))
        .collect::<Result<_, _>>()?;
    let peers: Vec<_> =
        listeners.iter().map(|l| l.local_addr().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let barrier = Barrier::new(ranks);
    let cpu = Mutex::new((0.0, 0.0));
    let times = Mutex::new(vec![vec![0.0f64; iters]; ranks]);
    let results: Vec<Result<(), String>> = thread::scope(|sc| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, barrier, times, cpu) = (&peers, &barrier, &times, &cpu);
                sc.spawn(move || -> Result<(), String> {
                    let ring = RingCollective::connect(rank, ranks, 5, listener, peers, Duration::from_secs(120))
                        .map_err(|e| e.to_string())?;
                    let mut x: Vec<f32> = (0..n).map(|i| ((i * 7 + rank * 13) % 1000) as f32 * 1e-3).collect();
                    ring.all_reduce_avg(&Cpu, &mut x).map_err(|e| e.to_string())?;
                    barrier.wait();
                    if rank == 0 {
                        cpu.lock().map_err(|_| "lock poisoned")?.0 = cpu_seconds();
                    }
                    for i in 0..iters {
                        barrier.wait();
                        let t0 = Instant::now();
                        ring.all_reduce_avg(&Cpu, &mut x).map_err(|e| e.to_string())?;
                        let dt = t0.elapsed().as_secs_f64();
                        times.lock().map_err(|_| "lock poisoned")?[rank][i] = dt;
                    }
                    barrier.wait();
                    if rank == 0 {
                        cpu.lock().map_err(|_| "lock poisoned")?.1 = cpu_seconds();
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("rank thread panicked".into()))).collect()
    });
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let times = times.into_inner().map_err(|_| "lock poisoned")?;
    let mut slowest: Vec<f64> = (0..iters).map(|i| times.iter().map(|t| t[i]).fold(0.0, f64::max)).collect();
    slowest.sort_by(f64::total_cmp);
    let (c0, c1) = cpu.into_inner().map_err(|_| "lock poisoned")?;
    Ok((slowest[iters / 2], (c1 - c0) / iters as f64))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !args.json {
        println!("{:>8} {:>6} {:>10} {:>12} {:>12} {:>10}", "MiB", "ranks", "ms", "algbw GB/s", "busbw GB/s", "cpu ms");
    }
    for &mib in &args.sizes_mib {
        let n = (mib << 20) / 4;
        let (secs, cpu) = match measure(args.ranks, n, args.iters) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {mib} MiB over {} ranks: {e}", args.ranks);
                return ExitCode::from(1);
            }
        };
        let bytes = (n * 4) as f64;
        let algbw = bytes / secs / 1e9;
        let busbw = algbw * 2.0 * (args.ranks - 1) as f64 / args.ranks as f64;
        if args.json {
            let line = serde_json::json!({
                "impl": "ring", "ranks": args.ranks, "mib": mib, "bytes": n * 4, "iters": args.iters,
                "median_s": secs, "algbw_gbs": algbw, "busbw_gbs": busbw, "cpu_s": cpu,
            });
            println!("{line}");
        } else {
            println!("{mib:>8} {:>6} {:>10.2} {algbw:>12.3} {busbw:>12.3} {:>10.2}", args.ranks, secs * 1e3, cpu * 1e3);
        }
    }
    ExitCode::SUCCESS
}
