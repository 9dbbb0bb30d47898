//! Helpers shared by the CLI integration tests: the binary under test, a kill-on-drop child, a
//! tiny model on disk, a coordinator process on 127.0.0.1:0 and test certificates.
//!
//! Each test file is its own crate with its own `mod common;`, and none of them uses every
//! helper: dead-code warnings are off here for what one crate happens not to use.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use model::testing;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The `bert2bert` binary under test, with the caller's environment as it is.
pub fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bert2bert"))
}

/// The binary run in `dir` with no token or coordinator from the caller's environment, logging
/// at `log`.
pub fn bin_logging(dir: &Path, log: &str) -> Command {
    let mut c = exe();
    c.current_dir(dir)
        .env_remove("BERT2BERT_TOKEN")
        .env_remove("BERT2BERT_WORKER_TOKEN")
        .env_remove("BERT2BERT_COORDINATOR")
        .env("BERT2BERT_LOG", log);
    c
}

/// [`bin_logging`] at `warn`.
pub fn bin(dir: &Path) -> Command {
    bin_logging(dir, "warn")
}

/// Runs `c` with `args`, echoing the command line and its stderr for a failing test's output.
fn run_echoed(mut c: Command, args: &[&str]) -> Output {
    let out = c.args(args).output().expect("run bert2bert");
    eprintln!("$ bert2bert {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

/// [`exe`] with `args`, echoed.
pub fn run(args: &[&str]) -> Output {
    run_echoed(exe(), args)
}

/// [`exe`] with `args` in `dir`, echoed.
pub fn run_in(args: &[&str], dir: &Path) -> Output {
    let mut c = exe();
    c.current_dir(dir);
    run_echoed(c, args)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Kills the child if it still runs when dropped (a stopped one too: SIGKILL ends it).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Proc {
    /// Sends `kill -SIG` (e.g. "TERM") and asserts that it was delivered.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.0.id().to_string()]).status().unwrap();
        assert!(ok.success(), "kill -{sig} {}", self.0.id());
    }

    /// The exit status, polled until `timeout`; `None` if it still runs then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A seed from the clock, different each run.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// `init` of a BERT2BERT model `b2b` from the BERT in `bert`, both relative to the working
/// directory.
pub const INIT_B2B: [&str; 9] =
    ["init", "--encoder", "bert", "--decoder", "bert", "--variant", "bert2bert", "--out", "b2b"];

/// Runs [`INIT_B2B`] with `c`, which must succeed.
pub fn init_b2b(mut c: Command) {
    let o = c.args(INIT_B2B).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A tiny random BERT in `root/bert`, `pairs` training pairs in `root/train.jsonl` and the
/// BERT2BERT model made from them in `root/b2b` (by [`bin`]).
pub fn tiny_model(root: &Path, pairs: usize) {
    testing::write_bert_dir(&root.join("bert"), clock_seed(), None);
    testing::write_pairs(&root.join("train.jsonl"), pairs);
    init_b2b(bin(root));
}

/// Like [`tiny_model`] with 4 training pairs and 1 in `root/valid.jsonl`, `init` run by
/// [`run_in`].
pub fn tiny_model_with_validation(root: &Path) {
    testing::write_bert_dir(&root.join("bert"), clock_seed(), None);
    testing::write_pairs(&root.join("train.jsonl"), 4);
    testing::write_pairs(&root.join("valid.jsonl"), 1);
    let o = run_in(&INIT_B2B, root);
    assert!(o.status.success());
}

/// One line from a child's output, trimmed.
pub fn read_line(out: &mut impl BufRead) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("read child output");
    line.trim().to_owned()
}

/// The address in a coordinator's first line, "listening on ADDR".
pub fn listening_on(line: &str) -> String {
    line.strip_prefix("listening on ").unwrap_or_else(|| panic!("no address: {line:?}")).to_owned()
}

/// Spawns the coordinator command `c` with its stdout piped; returns it with the address from
/// its first line.
pub fn spawn_coordinator(c: &mut Command) -> (Proc, String) {
    let mut coord = Proc(c.stdout(Stdio::piped()).spawn().unwrap());
    let line = read_line(&mut BufReader::new(coord.0.stdout.take().unwrap()));
    (coord, listening_on(&line))
}

/// A coordinator process in `root` on 127.0.0.1:0 with its state in `state`, accepting `token`
/// and given the `extra` arguments; returns it with its address.
pub fn coordinator(root: &Path, token: &str, extra: &[&OsStr]) -> (Proc, String) {
    spawn_coordinator(
        bin(root)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state", "state"])
            .args(extra)
            .env("BERT2BERT_TOKEN", token),
    )
}

/// A client command `c` with `args`, then `--coordinator url`, and `token`.
pub fn client(mut c: Command, url: &str, token: &str, args: &[&str]) -> Output {
    c.args(args).args(["--coordinator", url]).env("BERT2BERT_TOKEN", token).output().unwrap()
}

/// A fresh CA (random key) and a server certificate for 127.0.0.1 it issued: (ca, cert, key).
pub fn pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, cert, key, _) = pki_with_client(dir, name);
    (ca, cert, key)
}

/// [`pki`], plus a client certificate and key from the same CA.
pub fn pki_with_client(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf, (PathBuf, PathBuf)) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let write = |file: &str, text: String| {
        let p = dir.join(format!("{name}-{file}"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["worker".to_owned()]).unwrap().signed_by(&client_key, &issuer).unwrap();
    let client = (write("client.pem", client.pem()), write("client.key", client_key.serialize_pem()));
    (write("ca.pem", ca.pem()), write("cert.pem", cert.pem()), write("key.pem", key.serialize_pem()), client)
}
