//! The real `bert2bert coordinator` process on 127.0.0.1:0, driven by the real client
//! subcommands. No fixed sleeps: every wait is for a line or a process exit.

mod common;

use std::io::BufReader;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Proc, read_line, stdout};

const TOKEN: &str = "cli-test-token";

fn bin() -> Command {
    let mut c = common::exe();
    c.env_remove("BERT2BERT_TOKEN").env_remove("BERT2BERT_COORDINATOR").env("BERT2BERT_LOG", "warn");
    c
}

fn client(addr: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("BERT2BERT_COORDINATOR", format!("http://{addr}"))
        .env("BERT2BERT_TOKEN", TOKEN)
        .output()
        .unwrap()
}

fn write_job(dir: &Path, name: &str, steps: u64) -> String {
    let p = dir.join(format!("{name}.yaml"));
    let yaml = format!(
        "name: {name}\nmodel: {{ init: ./model }}\ndata: {{ train: ./train.jsonl }}\n\
         training: {{ steps: {steps}, global_batch: 4 }}\nresources: {{ workers: 1, device: cpu }}\n"
    );
    std::fs::write(&p, yaml).unwrap();
    p.display().to_string()
}

#[test]
fn coordinator_process_serves_the_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let state = dir.path().join("state");
    let (mut coord, addr) = spawn_coordinator(&state, &token_file);
    let addr = addr.as_str();

    // Submit: prints the job id; status and list show it PENDING.
    let job = write_job(dir.path(), "tiny", 10);
    let o = client(addr, &["submit", &job]);
    assert!(o.status.success(), "{o:?}");
    let id = stdout(&o).trim().to_owned();
    assert!(id.starts_with("job-"), "{id}");
    let o = client(addr, &["status", &id, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str(), v["total_steps"].as_u64()),
        (Some(&*id), Some("PENDING"), Some(10))
    );
    let o = client(addr, &["list"]);
    let table = stdout(&o);
    assert!(table.starts_with("ID") && table.contains(&id) && table.contains("PENDING"), "{table}");
    let o = client(addr, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(1));

    // A bad job file names the key and exits 2; a wrong token exits 2 with UNAUTHENTICATED.
    let bad = write_job(dir.path(), "bad", 0);
    let o = client(addr, &["submit", &bad]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("training.steps"), "{o:?}");
    let o = bin().args(["list", "--coordinator", addr]).env("BERT2BERT_TOKEN", "nope").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("UNAUTHENTICATED"), "{o:?}");
    let o = client(addr, &["status", "job-404"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // The server's INVALID_ARGUMENT (naming the field) is exit code 2 too.
    let o = client(addr, &["status", "no such id!"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("INVALID_ARGUMENT: job_id: "), "{o:?}");

    // submit --wait follows the job; cancelling it makes --wait exit 1.
    let mut waiter = Proc(
        bin()
            .args(["submit", &job, "--wait"])
            .env("BERT2BERT_COORDINATOR", format!("http://{addr}"))
            .env("BERT2BERT_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let waited_id = read_line(&mut BufReader::new(waiter.0.stdout.take().unwrap()));
    assert!(waited_id.starts_with("job-") && waited_id != id, "{waited_id}");
    let o = client(addr, &["cancel", &waited_id]);
    assert!(o.status.success() && stdout(&o).contains("CANCELLED"), "{o:?}");
    let status = waiter.0.wait().unwrap();
    assert_eq!(status.code(), Some(1), "--wait exits 1 when the job did not succeed");

    // SIGTERM: a clean exit.
    coord.signal("TERM");
    let status = coord.0.wait().unwrap();
    assert!(status.success(), "coordinator exit: {status:?}");

    // Restarted on the same state, after SIGTERM and after kill -9: the jobs are still there.
    for how in ["KILL", "TERM"] {
        let (mut coord, addr) = spawn_coordinator(&state, &token_file);
        let o = client(&addr, &["status", &id, "--json"]);
        assert!(o.status.success(), "{o:?}");
        let o = client(&addr, &["list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let states: Vec<_> = v["jobs"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
        assert_eq!(states, ["CANCELLED", "PENDING"]);
        coord.signal(how);
        coord.0.wait().unwrap();
    }
}

fn spawn_coordinator(state: &Path, token_file: &Path) -> (Proc, String) {
    common::spawn_coordinator(
        bin()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
            .arg(state)
            .arg("--token-file")
            .arg(token_file),
    )
}

#[test]
fn coordinator_without_a_token_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin().args(["coordinator", "--listen", "127.0.0.1:0", "--state"]).arg(dir.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("BERT2BERT_TOKEN"), "{o:?}");
}

#[test]
fn list_follows_every_page_and_delete_forgets_ended_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (mut coord, addr) = spawn_coordinator(&dir.path().join("state"), &token_file);
    let job = write_job(dir.path(), "paged", 10);
    // More jobs than one List page holds (100), submitted from a few threads at once.
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..26)
                        .map(|_| {
                            let o = client(&addr, &["submit", &job]);
                            assert!(o.status.success(), "{o:?}");
                            stdout(&o).trim().to_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let listed = |addr: &str| -> Vec<String> {
        let o = client(addr, &["list", "--json"]);
        assert!(o.status.success(), "{o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect()
    };
    let all = listed(&addr);
    assert_eq!(all.len(), 104, "every page is followed");
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| std::cmp::Reverse(id.trim_start_matches("job-").parse::<u64>().unwrap()));
    assert_eq!(all, sorted, "newest first, each job once");

    // delete: a PENDING job is refused (exit 1, FAILED_PRECONDITION), an ended one is gone.
    let victim = &ids[0];
    let o = client(&addr, &["delete", victim]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("FAILED_PRECONDITION"), "{o:?}");
    assert!(client(&addr, &["cancel", victim]).status.success());
    let o = client(&addr, &["delete", victim]);
    assert!(o.status.success() && stdout(&o).contains("deleted"), "{o:?}");
    assert_eq!(client(&addr, &["status", victim]).status.code(), Some(2), "NOT_FOUND");
    assert_eq!(client(&addr, &["delete", victim]).status.code(), Some(2), "NOT_FOUND");
    let after = listed(&addr);
    assert_eq!(after.len(), 103);
    assert!(!after.contains(victim));
    coord.signal("TERM");
    coord.0.wait().unwrap();
}

#[test]
fn coordinator_refuses_a_zero_length_job_store_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("coordinator.sqlite"), b"").unwrap();
    let o = bin()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
        .arg(&state)
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&state.join("coordinator.sqlite").display().to_string()) && err.contains("empty"), "{err}");
    assert_eq!(std::fs::metadata(state.join("coordinator.sqlite")).unwrap().len(), 0, "left alone");
}
