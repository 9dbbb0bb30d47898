//! The client side of the CLI contract against a real coordinator on 127.0.0.1:0: `watch` under a
//! pseudo-terminal (util-linux `script`) draws the live bar, errors and exit codes, the
//! BERT2BERT_COORDINATOR variable, and shell completions. No fixed sleeps: every wait polls a
//! condition under a deadline; every child is killed on drop.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, bin, stderr};

const TOKEN: &str = "watch-test-token";

/// A coordinator process on 127.0.0.1:0; returns it with its URL.
fn coordinator(root: &Path) -> (Proc, String) {
    let (coord, addr) = common::coordinator(root, TOKEN, &[]);
    (coord, format!("http://{addr}"))
}

fn client(root: &Path, url: &str, args: &[&str]) -> Output {
    common::client(bin(root), url, TOKEN, args)
}

/// A tiny BERT2BERT model, data and a 10-step one-worker job in `root`.
fn setup(root: &Path) {
    common::tiny_model(root, 8);
    std::fs::write(
        root.join("job.yaml"),
        "name: tiny-watch\nmodel: { init: b2b }\n\
         data: { train: train.jsonl, max_source_len: 16, max_target_len: 12 }\n\
         training: { steps: 10, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 5 }\n\
         checkpoint: { dir: ckpt, every_steps: 5, keep: 1 }\nresources: { workers: 1, device: cpu }\n",
    )
    .unwrap();
}

/// Waits until `cond` holds on what the child wrote so far, or panics after `secs`.
fn wait_for(buf: &Mutex<Vec<u8>>, child: &mut Proc, secs: u64, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if cond(&text) {
            return;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            // The reader thread may still hold the last bytes; one more look after it drains.
            std::thread::sleep(Duration::from_millis(100));
            let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
            assert!(cond(&text), "exited ({status}) before {what}:\n{text}");
            return;
        }
        assert!(Instant::now() < deadline, "no {what} within {secs}s:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_script() -> bool {
    Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn watch_draws_a_live_bar_on_a_terminal() {
    if !has_script() {
        eprintln!("skipped: util-linux `script` (for a pseudo-terminal) is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let (_coord, url) = coordinator(root);
    let o = client(root, &url, &["submit", "job.yaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();

    // `script` gives `watch` a pseudo-terminal for stdout and stderr and copies what it draws to
    // our pipe; a fixed size makes the frames independent of the caller's terminal.
    let cmd =
        format!("stty cols 120 rows 40; exec '{}' watch {id} --coordinator {url}", env!("CARGO_BIN_EXE_bert2bert"));
    let mut watch = Proc(
        Command::new("script")
            .current_dir(root)
            .args(["-qfec", &cmd, "/dev/null"])
            .env_remove("BERT2BERT_COORDINATOR")
            .env("BERT2BERT_TOKEN", TOKEN)
            .env("BERT2BERT_LOG", "warn")
            .env("TERM", "xterm")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = watch.0.stdout.take().unwrap();
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });

    // The first frame (the job still PENDING) means the stream is open: only now start the
    // worker, so every event of the run reaches the bar.
    wait_for(&out, &mut watch, 60, "the first frame", |t| t.contains(&format!("{id} PENDING")));
    let _worker =
        Proc(bin(root).args(["worker", "--coordinator", &url]).env("BERT2BERT_WORKER_TOKEN", TOKEN).spawn().unwrap());
    wait_for(&out, &mut watch, 300, "the end of the job", |t| t.contains("SUCCEEDED"));
    let status = watch.wait_exit(Duration::from_secs(30)).expect("watch did not exit after the job ended");
    reader.join().unwrap();
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(status.success(), "watch exit {status}:\n{text}");

    // The final frame: step 10/10 with a full bar and the training numbers under it.
    let full = format!("{id} SUCCEEDED step 10/10 [{}] 100%", "=".repeat(30));
    assert!(text.contains(&full), "no final frame {full:?} in:\n{text}");
    let after = &text[text.rfind(&full).unwrap()..];
    assert!(after.contains("loss ") && after.contains(" tok/s") && after.contains("eta "), "{after}");
    // Frames on the way, not just the last one (indicatif lets a burst of redraws through).
    assert!((1..10).any(|k| text.contains(&format!(" step {k}/10 ["))), "no intermediate frame:\n{text}");
    // A live display redraws in place (cursor movement / line erase), which plain lines never do.
    assert!(text.contains("\x1b["), "no terminal control sequences: {text:?}");
    assert!(!text.contains("/10 loss "), "plain progress lines on a terminal:\n{text}");
}

#[test]
fn errors_are_plain_words_with_the_contract_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (_coord, url) = coordinator(root);

    // An unknown job: NOT_FOUND naming it, exit 2.
    let o = client(root, &url, &["watch", "job-404"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("NOT_FOUND: ") && err.contains("job-404"), "{err}");

    // Nothing listens on a port we just freed: exit 1, a message naming the address, no panic.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for args in [&["watch", "job-1"][..], &["status", "job-1"], &["list"]] {
        let o = bin(root).args(args).args(["--coordinator", &format!("127.0.0.1:{port}")]).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&format!("error: cannot reach the coordinator at http://127.0.0.1:{port}")), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn the_coordinator_address_comes_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let (_coord, url) = coordinator(root);
    let run = |args: &[&str], env: Option<&str>| {
        let mut c = bin(root);
        c.args(args).env("BERT2BERT_TOKEN", TOKEN);
        if let Some(u) = env {
            c.env("BERT2BERT_COORDINATOR", u);
        }
        c.output().unwrap()
    };
    let o = run(&["submit", "job.yaml"], Some(&url));
    assert!(o.status.success(), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let o = run(&["status", &id, "--json"], Some(&url));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["id"].as_str(), v["state"].as_str()), (Some(&*id), Some("PENDING")));
    let o = run(&["list"], Some(&url));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let header: Vec<&str> = table.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["ID", "NAME", "STATE", "STEP", "WORKERS", "RESTARTS", "UPDATED", "REASON"]);
    assert!(table.lines().nth(1).is_some_and(|l| l.contains(&id) && l.contains(" ago")), "{table}");
    // --coordinator wins over the variable.
    let o = bin(root)
        .args(["status", &id, "--coordinator", &url])
        .env("BERT2BERT_COORDINATOR", "127.0.0.1:1")
        .env("BERT2BERT_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Neither: a usage error that names both.
    let o = run(&["list"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--coordinator"), "{}", stderr(&o));
}

#[test]
fn completions_cover_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let help = bin(tmp.path()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    // The subcommands as `--help` lists them (the oracle), e.g. "  submit  Submit a job ...".
    let subcommands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    for expected in ["submit", "watch", "status", "list", "cancel", "completions", "train", "worker"] {
        assert!(subcommands.iter().any(|c| c == expected), "{expected} not in --help:\n{help}");
    }
    let bash = bin(tmp.path()).args(["completions", "bash"]).output().unwrap();
    assert!(bash.status.success(), "{}", stderr(&bash));
    let bash = String::from_utf8_lossy(&bash.stdout).into_owned();
    assert!(bash.contains("complete -F _bert2bert"), "not a bash completion script:\n{bash}");
    // The top-level word list, e.g. `opts="-h -V --help --version init score ... help"`.
    let top = bash
        .lines()
        .find_map(|l| l.trim().strip_prefix("opts=\"").filter(|o| o.contains("--version")))
        .unwrap_or_else(|| panic!("no top-level opts in:\n{bash}"));
    let words: Vec<&str> = top.trim_end_matches('"').split_whitespace().collect();
    for c in &subcommands {
        assert!(words.contains(&c.as_str()), "{c} not completed: {top}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = bin(tmp.path()).args(["completions", shell]).output().unwrap();
        assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("submit"), "{shell}: {o:?}");
    }
    let o = bin(tmp.path()).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "an unknown shell is bad usage: {o:?}");
}
