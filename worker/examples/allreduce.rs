//! All-reduce bandwidth of `worker::ring::RingCollective` on loopback, one process per rank.
//!
//! `cargo run --release -p worker --example allreduce -- --ranks 2 --sizes 1,4,16,64,256 --iters 10 [--json] [--threads]`
//!
//! The command binds one loopback listener per rank and starts itself again once per rank (the
//! hidden `--rank R --peers ADDR,.. --listen-fd FD` mode; the listener's socket is inherited),
//! as torch.distributed runs one process per rank, and reads each rank's timings from its
//! stdout (one JSON line per size). `--threads` runs the ranks as threads of this process
//! instead (the mode of the earlier numbers in BENCHMARKS.md).
//!
//! Sizes are MiB of f32 per rank. Each timed iteration starts after a barrier (an all-reduce of
//! a few floats on the same ring, as gloo's barrier is a collective; a `std::sync::Barrier` with
//! `--threads`); its time is the slowest rank's, and a size reports the median over `--iters`
//! (after one warm-up call), and the CPU time (user + system, all ranks together, ring threads
//! included) per call: on a busy machine wall times swing, CPU time much less.
//! Algorithm bandwidth is bytes / time; bus bandwidth multiplies it by 2 (n - 1) / n, the share
//! of the buffer each rank sends and receives in a ring all-reduce. `bench/allreduce/run.sh`
//! compares these numbers with torch.distributed's gloo backend.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Barrier, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use kernels::Cpu;
use kernels::collective::Collective;
use worker::ring::RingCollective;

const TIMEOUT: Duration = Duration::from_secs(120);
const TOKEN: u64 = 5;

struct Args {
    ranks: usize,
    sizes_mib: Vec<usize>,
    iters: usize,
    json: bool,
    threads: bool,
    /// Set in a rank process: its rank, every rank's address, and its inherited listener.
    rank: Option<(usize, Vec<SocketAddr>, RawFd)>,
}

const USAGE: &str = "usage: allreduce [--ranks N] [--sizes MIB,MIB,..] [--iters N] [--json] [--threads]";

fn parse_args() -> Result<Args, String> {
    let mut a =
        Args { ranks: 2, sizes_mib: vec![1, 4, 16, 64, 256], iters: 10, json: false, threads: false, rank: None };
    let (mut rank, mut peers, mut fd) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let parse = |s: &str, what: &str| -> Result<usize, String> {
            s.trim().parse::<usize>().map_err(|_| format!("{what}: `{s}` is not a non-negative integer"))
        };
        let number = |s: &str, what: &str| match parse(s, what)? {
            0 => Err(format!("{what}: `{s}` must be positive")),
            v => Ok(v),
        };
        match flag.as_str() {
            "--ranks" => a.ranks = number(&value()?, "--ranks")?,
            "--iters" => a.iters = number(&value()?, "--iters")?,
            "--sizes" => a.sizes_mib = value()?.split(',').map(|s| number(s, "--sizes")).collect::<Result<_, _>>()?,
            "--json" => a.json = true,
            "--threads" => a.threads = true,
            // Hidden: set by the parent for each rank process.
            "--rank" => rank = Some(parse(&value()?, "--rank")?),
            "--listen-fd" => fd = Some(parse(&value()?, "--listen-fd")? as RawFd),
            "--peers" => {
                let v = value()?;
                peers = Some(
                    v.split(',')
                        .map(|s| s.parse().map_err(|e| format!("--peers: `{s}`: {e}")))
                        .collect::<Result<Vec<_>, _>>()?,
                );
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    match (rank, peers, fd) {
        (None, None, None) => {}
        (Some(r), Some(p), Some(fd)) if r < p.len() => a.rank = Some((r, p, fd)),
        _ => return Err("--rank, --peers and --listen-fd go together (rank < number of peers)".into()),
    }
    Ok(a)
}

/// User + system CPU seconds of this process so far (all its threads).
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

fn test_data(n: usize, rank: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 13) % 1000) as f32 * 1e-3).collect()
}

/// One size's result: median seconds per all-reduce (slowest rank per iteration) and CPU
/// seconds per all-reduce (all ranks).
fn summarize(times: &[Vec<f64>], cpu_total: f64, iters: usize) -> (f64, f64) {
    let mut slowest: Vec<f64> = (0..iters).map(|i| times.iter().map(|t| t[i]).fold(0.0, f64::max)).collect();
    slowest.sort_by(f64::total_cmp);
    (slowest[iters / 2], cpu_total / iters as f64)
}

// ---- process mode: a rank process ----

/// The body of a rank process: every size in turn on one ring, one JSON line per size on stdout
/// (`times`: seconds of each timed call; `cpu_s`: this process's CPU seconds over the timed loop).
fn rank_main(rank: usize, peers: &[SocketAddr], fd: RawFd, sizes_mib: &[usize], iters: usize) -> Result<(), String> {
    // SAFETY: the parent passed this descriptor (a bound, listening TCP socket) to this process
    // alone, and nothing else here owns it.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let world = peers.len();
    let ring = RingCollective::connect(rank, world, TOKEN, listener, peers, TIMEOUT).map_err(|e| e.to_string())?;
    let mut token = vec![0.0f32; world];
    let mut barrier = || ring.all_reduce_avg(&Cpu, &mut token).map_err(|e| format!("barrier: {e}"));
    for &mib in sizes_mib {
        let n = (mib << 20) / 4;
        let mut x = test_data(n, rank);
        ring.all_reduce_avg(&Cpu, &mut x).map_err(|e| e.to_string())?;
        let mut times = vec![0.0f64; iters];
        barrier()?;
        let c0 = cpu_seconds();
        for t in times.iter_mut() {
            barrier()?;
            let t0 = Instant::now();
            ring.all_reduce_avg(&Cpu, &mut x).map_err(|e| e.to_string())?;
            *t = t0.elapsed().as_secs_f64();
        }
        barrier()?;
        let cpu = cpu_seconds() - c0;
        drop(x);
        println!("{}", serde_json::json!({ "rank": rank, "mib": mib, "times": times, "cpu_s": cpu }));
    }
    Ok(())
}

// ---- process mode: the parent ----

/// Lines from the rank processes' stdout: (rank, line), or (rank, None) at its end.
type Lines = mpsc::Receiver<(usize, Option<String>)>;
/// One size's reports, by rank: the timed calls' seconds and the CPU seconds of the loop.
type SizeReports = Vec<Option<(Vec<f64>, f64)>>;

/// The rank processes; dropping it kills and reaps those still running (on an error or a panic
/// in the parent; a parent killed outright takes them along through PR_SET_PDEATHSIG).
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn spawn_ranks(args: &Args) -> Result<(Ranks, Vec<thread::JoinHandle<()>>, Lines), String> {
    let listeners: Vec<_> = (0..args.ranks)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}")))
        .collect::<Result<_, _>>()?;
    let peers: Vec<SocketAddr> =
        listeners.iter().map(|l| l.local_addr().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let peers_arg = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let sizes_arg = args.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let parent = std::process::id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    let mut ranks = Ranks(Vec::new());
    let mut readers = Vec::new();
    for (rank, listener) in listeners.iter().enumerate() {
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.args(["--rank", &rank.to_string(), "--peers", &peers_arg, "--listen-fd", &fd.to_string()])
            .args(["--sizes", &sizes_arg, "--iters", &args.iters.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: runs in the forked child before exec and calls only async-signal-safe
        // functions (fcntl, prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                // Keep this rank's listener across exec (std opens sockets close-on-exec).
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                #[cfg(target_os = "linux")]
                {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() != parent {
                        return Err(std::io::Error::other("parent exited"));
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("start rank {rank} ({}): {e}", exe.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        ranks.0.push(child);
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send((rank, Some(l))).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send((rank, None));
        }));
    }
    // The children hold their own copies of the listeners now.
    drop(listeners);
    Ok((ranks, readers, rx))
}

fn describe(rank: usize, st: ExitStatus) -> String {
    if st.code().is_some() {
        format!("rank {rank} process failed ({st}; its error is on stderr above)")
    } else {
        format!("rank {rank} process was killed ({st})")
    }
}

/// Runs the rank processes; calls `report(mib, median_s, cpu_s_per_call)` as each size completes.
fn measure_processes(args: &Args, mut report: impl FnMut(usize, f64, f64)) -> Result<(), String> {
    let (mut ranks, readers, rx) = spawn_ranks(args)?;
    let world = args.ranks;
    // per size: each rank's times and CPU seconds
    let mut got: Vec<SizeReports> = vec![vec![None; world]; args.sizes_mib.len()];
    let mut next = 0;
    let mut open = world;
    let mut failure: Option<String> = None;
    while open > 0 && failure.is_none() {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((rank, Some(line))) => {
                let v: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| format!("rank {rank}: bad output line `{line}`: {e}"))?;
                let mib = v["mib"].as_u64().unwrap_or(0) as usize;
                let times: Option<Vec<f64>> =
                    v["times"].as_array().map(|a| a.iter().filter_map(|t| t.as_f64()).collect());
                let (Some(times), Some(cpu)) = (times, v["cpu_s"].as_f64()) else {
                    return Err(format!("rank {rank}: bad output line `{line}`"));
                };
                let slot = got.iter().position(|s| s[rank].is_none()).filter(|&i| args.sizes_mib[i] == mib);
                let Some(i) = slot.filter(|_| times.len() == args.iters) else {
                    return Err(format!("rank {rank}: unexpected output line `{line}`"));
                };
                got[i][rank] = Some((times, cpu));
                while next < got.len() && got[next].iter().all(Option::is_some) {
                    let rows: Vec<_> = got[next].iter().flatten().collect();
                    let times: Vec<Vec<f64>> = rows.iter().map(|(t, _)| t.clone()).collect();
                    let cpu: f64 = rows.iter().map(|(_, c)| c).sum();
                    let (secs, cpu) = summarize(&times, cpu, args.iters);
                    report(args.sizes_mib[next], secs, cpu);
                    next += 1;
                }
            }
            Ok((_, None)) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // A rank that failed: give the others a moment to fail too (a dead peer closes their
        // sockets), so that the report names every rank that went wrong.
        for (rank, c) in ranks.0.iter_mut().enumerate() {
            if let Ok(Some(st)) = c.try_wait()
                && !st.success()
            {
                failure = Some(describe(rank, st));
            }
        }
    }
    if failure.is_some() {
        thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(if failure.is_some() { 1 } else { 30 });
    let mut errors = Vec::new();
    for (rank, c) in ranks.0.iter_mut().enumerate() {
        let st = loop {
            match c.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => break None,
            }
        };
        match st {
            Some(st) if !st.success() => errors.push(describe(rank, st)),
            Some(_) => {}
            None => errors.push(format!("rank {rank} process still running; killed")),
        }
    }
    drop(ranks);
    for r in readers {
        let _ = r.join();
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    if next < got.len() {
        return Err(format!("the rank processes exited after {next} of {} sizes", got.len()));
    }
    Ok(())
}

// ---- thread mode ----

/// Median seconds per all-reduce of `n` floats over `ranks` ring ranks as threads of this
/// process (slowest rank per iteration), and CPU seconds per all-reduce (all ranks).
fn measure_threads(ranks: usize, n: usize, iters: usize) -> Result<(f64, f64), String> {
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
                    let ring = RingCollective::connect(rank, ranks, TOKEN, listener, peers, TIMEOUT)
                        .map_err(|e| e.to_string())?;
                    let mut x = test_data(n, rank);
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
    let (c0, c1) = cpu.into_inner().map_err(|_| "lock poisoned")?;
    Ok(summarize(&times, c1 - c0, iters))
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
    if let Some((rank, peers, fd)) = &args.rank {
        return match rank_main(*rank, peers, *fd, &args.sizes_mib, args.iters) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: rank {rank} of {}: {e}", peers.len());
                ExitCode::from(1)
            }
        };
    }
    if !args.json {
        println!("{:>8} {:>6} {:>10} {:>12} {:>12} {:>10}", "MiB", "ranks", "ms", "algbw GB/s", "busbw GB/s", "cpu ms");
    }
    let mode = if args.threads { "threads" } else { "processes" };
    let report = |mib: usize, secs: f64, cpu: f64| {
        let bytes = (mib << 20) as f64;
        let algbw = bytes / secs / 1e9;
        let busbw = algbw * 2.0 * (args.ranks - 1) as f64 / args.ranks as f64;
        if args.json {
            let line = serde_json::json!({
                "impl": "ring", "mode": mode, "ranks": args.ranks, "mib": mib, "bytes": mib << 20,
                "iters": args.iters, "median_s": secs, "algbw_gbs": algbw, "busbw_gbs": busbw, "cpu_s": cpu,
            });
            println!("{line}");
        } else {
            println!("{mib:>8} {:>6} {:>10.2} {algbw:>12.3} {busbw:>12.3} {:>10.2}", args.ranks, secs * 1e3, cpu * 1e3);
        }
    };
    if args.threads {
        for &mib in &args.sizes_mib {
            match measure_threads(args.ranks, (mib << 20) / 4, args.iters) {
                Ok((secs, cpu)) => report(mib, secs, cpu),
                Err(e) => {
                    eprintln!("error: {mib} MiB over {} ranks (threads): {e}", args.ranks);
                    return ExitCode::from(1);
                }
            }
        }
    } else if let Err(e) = measure_processes(&args, report) {
        eprintln!("error: {} rank processes: {e}", args.ranks);
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
