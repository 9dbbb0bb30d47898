//! `bert2bert coordinator` with TLS (certificates made here with rcgen) and --metrics-listen,
//! driven by the real `list` client. Every wait is for a line or a process exit.

mod common;

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Proc, listening_on, pki, pki_with_client, read_line, stderr};

const TOKEN: &str = "tls-test-token";

fn bin() -> Command {
    let mut c = common::exe();
    for var in ["BERT2BERT_COORDINATOR", "BERT2BERT_TLS_CA", "BERT2BERT_TLS_CERT", "BERT2BERT_TLS_KEY"] {
        c.env_remove(var);
    }
    c.env("BERT2BERT_TOKEN", TOKEN).env("BERT2BERT_LOG", "warn");
    c
}

fn list(url: &str, extra: &[&Path]) -> Output {
    let mut c = bin();
    c.args(["list", "--coordinator", url]);
    if let Some(ca) = extra.first() {
        c.arg("--tls-ca").arg(ca);
    }
    c.output().unwrap()
}

#[test]
fn tls_coordinator_serves_https_clients_that_trust_its_ca_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path(), "good");
    let (other_ca, _, _) = pki(dir.path(), "other");
    let mut coord = Proc(
        bin()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--state"])
            .arg(dir.path().join("state"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(coord.0.stdout.take().unwrap());
    let addr = listening_on(&read_line(&mut out));
    let second = read_line(&mut out);
    let metrics = second.strip_prefix("metrics on http://").and_then(|m| m.strip_suffix("/metrics"));
    let metrics = metrics.unwrap_or_else(|| panic!("{second:?}")).to_owned();
    let https = format!("https://{addr}");

    let o = list(&https, &[&ca]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ID"), "{o:?}");
    // The CA may come from the environment too.
    let o = bin().args(["list", "--json", "--coordinator", &https]).env("BERT2BERT_TLS_CA", &ca).output().unwrap();
    assert!(o.status.success(), "{o:?}");

    let o = list(&format!("http://{addr}"), &[]);
    assert!(!o.status.success(), "plain http to a TLS port: {o:?}");
    let o = list(&https, &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("no CA to trust: pass --tls-ca FILE or set BERT2BERT_TLS_CA"), "{o:?}");
    let o = list(&https, &[&other_ca]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("cannot reach the coordinator") && stderr(&o).contains("certificate"), "{o:?}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let o = list(&https, &[&junk]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains(&junk.display().to_string()), "{o:?}");

    // The two good `list` calls are counted.
    let mut s = std::net::TcpStream::connect(&metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let want = "bert2bert_rpc_requests_total{service=\"bert2bert.v1.JobService\",method=\"List\",code=\"OK\"} 2\n";
    assert!(text.contains(want), "{text}");
    assert!(text.contains("\nbert2bert_jobs{state=\"PENDING\"} 0\n"), "{text}");

    coord.signal("TERM");
    assert!(coord.0.wait().unwrap().success());
}

#[test]
fn coordinator_refuses_tls_files_that_are_not_pem_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = pki(dir.path(), "good");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN NONSENSE-----\n").unwrap();
    let missing = dir.path().join("missing.pem");
    for (c, k) in [(&junk, &key), (&cert, &junk), (&missing, &key)] {
        let o = bin()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
            .arg(dir.path().join("state"))
            .arg("--tls-cert")
            .arg(c)
            .arg("--tls-key")
            .arg(k)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        let named = if c == &cert { k } else { c };
        assert!(stderr(&o).contains(&named.display().to_string()), "{o:?}");
    }
    // --tls-cert without --tls-key is a usage error too.
    let o = bin()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
        .arg(dir.path().join("state"))
        .arg("--tls-cert")
        .arg(&cert)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[test]
fn worker_with_device_cuda_and_no_driver_exits_2_with_the_message() {
    let o = bin().args(["worker", "--device", "cuda", "--coordinator", "http://127.0.0.1:9"]).output().unwrap();
    let err = stderr(&o);
    if !err.contains("no CUDA driver") {
        // A driver is present here: the worker opened the device and then failed to reach the
        // (absent) coordinator.
        eprintln!("a CUDA driver is present: nothing to check ({err})");
        assert!(!err.contains("panicked"), "{err}");
        return;
    }
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(err.contains("no CUDA driver found; use --device cpu"), "{err}");
    let o = bin().args(["worker", "--device", "tpu", "--coordinator", "http://127.0.0.1:9"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("unknown device `tpu`"), "{o:?}");
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, (client_cert, client_key)) = pki_with_client(dir.path(), "good");
    let (_, _, _, (foreign_cert, foreign_key)) = pki_with_client(dir.path(), "other");
    let (_coord, addr) = common::spawn_coordinator(
        bin()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
            .arg(dir.path().join("state"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-client-ca")
            .arg(&ca),
    );
    let https = format!("https://{addr}");
    let list_as = |identity: Option<(&Path, &Path)>| {
        let mut c = bin();
        c.args(["list", "--coordinator", &https]).arg("--tls-ca").arg(&ca);
        if let Some((cert, key)) = identity {
            c.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        c.output().unwrap()
    };
    let o = list_as(Some((&client_cert, &client_key)));
    assert!(o.status.success(), "{o:?}");
    let o = list_as(None);
    assert!(!o.status.success(), "no client certificate: {o:?}");
    let o = list_as(Some((&foreign_cert, &foreign_key)));
    assert!(!o.status.success(), "a client certificate from another CA: {o:?}");
    // Also from the environment.
    let o = bin()
        .args(["list", "--coordinator", &https])
        .env("BERT2BERT_TLS_CA", &ca)
        .env("BERT2BERT_TLS_CERT", &client_cert)
        .env("BERT2BERT_TLS_KEY", &client_key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}
