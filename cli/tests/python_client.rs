//! clients/python/bert2bert_client.py (grpcio, stubs generated from proto/ at run time) against a
//! real coordinator and worker process on 127.0.0.1:0: it submits a job, follows Watch to the
//! end, and its final status equals `bert2bert status --json`; over TLS it trusts only the
//! coordinator's CA. Needs $B2B_PYTHON with grpcio and
//! grpcio-tools (scripts/setup_python.sh); skips without it unless B2B_REQUIRE_PYTHON=1.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Proc, bin, pki};

const TOKEN: &str = "python-client-test-token";

/// The interpreter to use, or None (after saying why) when the test should be skipped.
fn python() -> Option<PathBuf> {
    let required = std::env::var("B2B_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
    let skip = |why: String| {
        assert!(!required, "B2B_REQUIRE_PYTHON=1 but {why}");
        eprintln!("skipped: {why} (run scripts/setup_python.sh and set B2B_PYTHON)");
        None
    };
    let Some(py) = std::env::var_os("B2B_PYTHON").filter(|p| !p.is_empty()).map(PathBuf::from) else {
        return skip("B2B_PYTHON is not set".into());
    };
    match Command::new(&py).args(["-c", "import grpc, grpc_tools"]).output() {
        Ok(o) if o.status.success() => Some(py),
        Ok(o) => skip(format!("{} cannot import grpc: {}", py.display(), String::from_utf8_lossy(&o.stderr))),
        Err(e) => skip(format!("cannot run {}: {e}", py.display())),
    }
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python/bert2bert_client.py")
}

#[test]
fn python_client_submits_watches_and_reads_the_final_status() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model(root, 8);
    // The client sends the file as it is: absolute paths, as the API asks.
    let r = root.display();
    std::fs::write(
        root.join("job.yaml"),
        format!(
            "name: py-client\nmodel: {{ init: {r}/b2b }}\n\
             data: {{ train: {r}/train.jsonl, max_source_len: 16, max_target_len: 12 }}\n\
             training: {{ steps: 6, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 9 }}\n\
             checkpoint: {{ dir: {r}/ckpt, every_steps: 3, keep: 1 }}\nresources: {{ workers: 1, device: cpu }}\n"
        ),
    )
    .unwrap();
    std::fs::write(root.join("token"), format!("{TOKEN}\n")).unwrap();

    let (_coord, addr) = common::coordinator(root, TOKEN, &[]);

    let stubs = root.join("stubs");
    let mut client = Proc(
        Command::new(&py)
            .arg(client_script())
            .args(["--coordinator", &addr, "--token-file", "token", "--stubs-dir"])
            .arg(&stubs)
            .args(["submit", "job.yaml", "--watch"])
            .current_dir(root)
            .env_remove("BERT2BERT_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let err = BufReader::new(client.0.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut lines = Vec::new();
    let next_line = |lines: &mut Vec<String>| -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                lines.push(l.clone());
                Some(l)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the client printed nothing for too long:\n{lines:#?}"),
        }
    };
    // The stream's first event is the job, still PENDING: only now start the worker, so every
    // progress event of the run reaches the client.
    loop {
        let l = next_line(&mut lines).unwrap_or_else(|| panic!("client ended before watching: {lines:#?}"));
        if l.contains(" PENDING step 0/6") {
            break;
        }
    }
    let _worker =
        Proc(bin(root).args(["worker", "--coordinator", &addr]).env("BERT2BERT_WORKER_TOKEN", TOKEN).spawn().unwrap());
    while next_line(&mut lines).is_some() {}
    reader.join().unwrap();
    let status = client.0.wait().unwrap();
    let mut out = String::new();
    client.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "client exit {status}\nstdout: {out}\nstderr: {lines:#?}");

    // Progress as the client printed it: "step N/6 loss L lr ... tok/s eta ...s", steps rising.
    let steps: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("step ")?;
            let (step, rest) = rest.split_once("/6 loss ")?;
            Some((step.parse().ok()?, rest.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    assert!(!steps.is_empty(), "no progress events: {lines:#?}");
    assert!(steps.windows(2).all(|w| w[0].0 < w[1].0), "steps not rising: {steps:?}");
    assert!(steps.iter().all(|&(s, loss)| (1..=6).contains(&s) && loss.is_finite() && loss > 0.0), "{steps:?}");
    assert!(lines.iter().any(|l| l.ends_with("SUCCEEDED step 6/6")), "{lines:#?}");

    // stdout: the job id, then the final status, which must equal the Rust CLI's.
    let mut out_lines = out.lines();
    let id = out_lines.next().unwrap_or("").to_owned();
    assert!(id.starts_with("job-"), "{out}");
    let from_python: serde_json::Value = serde_json::from_str(out_lines.next().unwrap_or("")).unwrap();
    let o = common::client(bin(root), &addr, TOKEN, &["status", &id, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_cli: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(from_python, from_cli);
    assert_eq!((from_cli["state"].as_str(), from_cli["step"].as_u64()), (Some("SUCCEEDED"), Some(6)));

    // The ended job can be deleted from Python; list (which follows pages) no longer has it.
    let py_client = |args: &[&str]| {
        Command::new(&py)
            .arg(client_script())
            .args(["--coordinator", &addr])
            .args(args)
            .env("BERT2BERT_TOKEN", TOKEN)
            .output()
            .unwrap()
    };
    let o = py_client(&["delete", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = py_client(&["list"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(listed["jobs"].as_array().unwrap().iter().all(|j| j["id"] != id.as_str()), "{listed}");

    // The generated stubs are where we asked, and errors keep the CLI's codes and words.
    assert!(stubs.join("bert2bert/v1/jobs_pb2_grpc.py").is_file());
    let o = Command::new(&py)
        .arg(client_script())
        .args(["--coordinator", &addr, "get", "job-404"])
        .env("BERT2BERT_TOKEN", TOKEN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("NOT_FOUND: ") && err.contains("job-404"), "{err}");
    let o = Command::new(&py)
        .arg(client_script())
        .args(["--coordinator", &addr, "list"])
        .env_remove("BERT2BERT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "no token: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("UNAUTHENTICATED"), "{o:?}");
}

#[test]
fn python_client_speaks_tls_with_the_coordinators_ca() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ca, cert, key) = pki(root, "good");
    let (other_ca, _, _) = pki(root, "other");
    let tls = [OsStr::new("--tls-cert"), cert.as_os_str(), OsStr::new("--tls-key"), key.as_os_str()];
    let (_coord, addr) = common::coordinator(root, TOKEN, &tls);
    let list = |url: &str, ca: Option<&Path>| {
        let mut c = Command::new(&py);
        c.arg(client_script()).args(["--coordinator", url]);
        if let Some(ca) = ca {
            c.arg("--tls-ca").arg(ca);
        }
        c.arg("list").env("BERT2BERT_TOKEN", TOKEN).env_remove("BERT2BERT_TLS_CA").output().unwrap()
    };
    let https = format!("https://{addr}");
    let o = list(&https, Some(&ca));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(0), "{v}");
    // A CA that did not sign the server's certificate, or plain http to a TLS port: refused.
    for (url, ca) in [(https.as_str(), Some(other_ca.as_path())), (addr.as_str(), None)] {
        let o = list(url, ca);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{url} {ca:?}: {err}");
        assert!(err.contains("error: UNAVAILABLE"), "{url} {ca:?}: {err}");
    }
}
