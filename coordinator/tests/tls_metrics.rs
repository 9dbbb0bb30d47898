//! TLS (certificates made here with rcgen, fresh keys every run) and the Prometheus endpoint,
//! against an in-process coordinator on 127.0.0.1:0.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coordinator::tls::Tls;
use coordinator::{Config, Running};
use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::worker_service_client::WorkerServiceClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Request, Status};

const TOKEN: &str = "secret";

const JOB: &str = "name: tiny\nmodel: { init: /models/m }\ndata: { train: /data/train.jsonl }\n\
    training: { steps: 10, global_batch: 4 }\nresources: { workers: 2, device: cpu, max_restarts: 3 }\n\
    checkpoint: { dir: /ckpt }\n";

#[derive(Clone)]
struct Bearer(String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", format!("Bearer {}", self.0).parse().unwrap());
        Ok(req)
    }
}

/// A CA and PEM files it issued: a server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path, name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![usage];
        (p.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(vec!["worker-1".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |file: &str, text: &str| {
        let p = dir.join(format!("{name}-{file}"));
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

async fn start(state: &Path, tls: Option<Tls>, metrics: bool) -> Running {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), state, TOKEN);
    config.tls = tls;
    config.metrics_listen = metrics.then(|| "127.0.0.1:0".parse().unwrap());
    config.heartbeat_interval = Duration::from_millis(100);
    config.heartbeat_timeout = Duration::from_millis(1500);
    coordinator::start(config).await.expect("coordinator starts")
}

/// The error and its sources, for messages that say what went wrong deep down.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out = format!("{out}: {s}");
        next = s.source();
    }
    out
}

/// Lists jobs over `url`, trusting `ca` (and presenting `identity`) when given.
async fn list(url: &str, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<usize, String> {
    let mut endpoint = Channel::from_shared(url.to_owned()).unwrap().connect_timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
        }
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| chain(&e))?;
        let mut c = JobServiceClient::with_interceptor(channel, Bearer(TOKEN.into()));
        let r = c.list(v1::ListJobsRequest::default()).await.map_err(|s| format!("{:?}: {}", s.code(), chain(&s)))?;
        Ok(r.into_inner().jobs.len())
    };
    tokio::time::timeout(Duration::from_secs(20), call).await.expect("a TLS call hangs")
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "good");
    let other = pki(dir.path(), "other");
    let tls = Tls::from_files(&good.server_cert, &good.server_key, None).unwrap();
    let c = start(&dir.path().join("state"), Some(tls), false).await;
    let url = c.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_eq!(list(&url, Some(&good.ca), None).await, Ok(0));
    // Plain HTTP/2 to a TLS port gets no answer it can use.
    let plain = list(&url.replacen("https", "http", 1), None, None).await;
    assert!(plain.is_err(), "{plain:?}");
    // A client that trusts another CA refuses the server's certificate.
    let e = list(&url, Some(&other.ca), None).await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    c.shutdown().await.unwrap();

    // Mutual TLS: a client certificate from the CA is required.
    let tls = Tls::from_files(&good.server_cert, &good.server_key, Some(&good.ca)).unwrap();
    let c = start(&dir.path().join("state"), Some(tls), false).await;
    assert!(list(&c.url(), Some(&good.ca), None).await.is_err(), "no client certificate");
    let foreign = list(&c.url(), Some(&good.ca), Some((&other.client_cert, &other.client_key))).await;
    assert!(foreign.is_err(), "a client certificate from another CA: {foreign:?}");
    assert_eq!(list(&c.url(), Some(&good.ca), Some((&good.client_cert, &good.client_key))).await, Ok(0));
    c.shutdown().await.unwrap();
}

#[test]
fn bad_tls_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "good");
    let other = pki(dir.path(), "other");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases: [(&Path, &Path, Option<&Path>, &Path); 5] = [
        (&junk, &good.server_key, None, &junk),
        (&missing, &good.server_key, None, &missing),
        (&good.server_cert, &junk, None, &junk),
        (&good.server_cert, &good.server_key, Some(&junk), &junk),
        // A key that belongs to another certificate.
        (&good.server_cert, &other.server_key, None, &good.server_cert),
    ];
    for (cert, key, ca, named) in cases {
        let e = Tls::from_files(cert, key, ca).unwrap_err();
        assert!(matches!(e, coordinator::Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains(&named.display().to_string()), "{e}");
    }
}

/// One HTTP/1.1 GET; returns the status code, the Content-Type and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(addr, "GET", path, "")
}

/// One HTTP/1.1 request (`extra`: more header lines, each ending in CRLF), read to the end:
/// the endpoint answers one request per connection.
fn http(addr: SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // One write of the whole request; a refused one (a header past the limit) may be answered
    // and closed before the server reads the rest, which the write then sees as a broken pipe:
    // the answer is still there to read.
    let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n");
    if let Err(e) = s.write_all(request.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing the request: {e}");
    }
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

/// Parses the Prometheus text format strictly enough to catch a malformed exposition: every
/// sample belongs to a family announced by `# TYPE`, names and labels are well formed, values
/// are numbers. Returns `name{labels}` -> value.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(&at);
            assert!(name_ok(name) && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{at}");
            families.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "{at}");
        let (key, value) = line.rsplit_once(' ').expect(&at);
        let value: f64 = value.parse().expect(&at);
        let name = key.split('{').next().unwrap();
        assert!(name_ok(name), "{at}");
        let family = families.get(name).unwrap_or_else(|| panic!("{at}: no # TYPE for {name}"));
        assert!(family != "counter" || value >= 0.0, "{at}: a negative counter");
        if let Some(labels) = key.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect(&at);
            for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").expect(&at);
                assert!(name_ok(k) && !v.trim_end_matches('"').contains('"'), "{at}");
            }
        }
        assert!(samples.insert(key.to_owned(), value).is_none(), "{at}: a duplicate sample");
    }
    samples
}

fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, ctype, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    parse_exposition(&body)
}

/// Scrapes until `what` holds (each scrape is logged on failure), for at most 20 s.
async fn scrape_until(addr: SocketAddr, why: &str, what: impl Fn(&HashMap<String, f64>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
        if what(&m) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {why}; last scrape {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(f64::NAN)
}

type Workers = WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A registered worker: its id and the secret its calls present.
#[derive(Clone)]
struct Worker {
    id: String,
    secret: String,
}

/// Requests the endpoint refuses: another path, another method, a header past its limit.
async fn check_refused_requests(addr: SocketAddr) {
    let (status, _, _) = tokio::task::spawn_blocking(move || http_get(addr, "/other")).await.unwrap();
    assert_eq!(status, 404);
    let huge = format!("X-Pad: {}\r\n", "a".repeat(9 << 10));
    let odd = tokio::task::spawn_blocking(move || {
        [
            http(addr, "POST", "/metrics", "Content-Length: 0\r\n"),
            http(addr, "HEAD", "/metrics", ""),
            http(addr, "DELETE", "/other", ""),
            http(addr, "GET", "/metrics", &huge),
        ]
    });
    let statuses: Vec<u16> = odd.await.unwrap().iter().map(|r| r.0).collect();
    assert_eq!(statuses, [405, 405, 405, 431]);
}

/// Registers one CPU worker per ring port.
async fn register_workers(workers: &mut Workers, ports: &[u16]) -> Vec<Worker> {
    let mut out = Vec::new();
    for port in ports {
        let reg = v1::RegisterWorkerRequest {
            hostname: "h".into(),
            capabilities: Some(v1::Capabilities { device: "cpu".into(), ..Default::default() }),
            ring_address: format!("127.0.0.1:{port}"),
            version: "0".into(),
        };
        let r = workers.register(reg).await.unwrap().into_inner();
        out.push(Worker { id: r.worker_id, secret: r.worker_secret });
    }
    out
}

/// Heartbeats for every worker each 100 ms until the returned sender says stop.
fn heartbeat_until_stopped(
    workers: &Workers,
    gang: &[Worker],
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let (mut w, gang) = (workers.clone(), gang.to_vec());
    let beats = tokio::spawn(async move {
        while !*stop.borrow() {
            for wk in &gang {
                let hb = v1::HeartbeatRequest {
                    worker_id: wk.id.clone(),
                    worker_secret: wk.secret.clone(),
                    ..Default::default()
                };
                let _ = w.heartbeat(hb).await;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), stop.changed()).await;
        }
    });
    (stop_tx, beats)
}

/// Each worker's assignment: rank -> (worker, attempt).
async fn take_assignments(workers: &mut Workers, gang: &[Worker]) -> HashMap<u32, (Worker, u32)> {
    let mut ranks = HashMap::new();
    for wk in gang {
        let req = v1::GetAssignmentRequest {
            worker_id: wk.id.clone(),
            wait_ms: 2_000,
            worker_secret: wk.secret.clone(),
            ..Default::default()
        };
        let a = workers.get_assignment(req).await.unwrap().into_inner().assignment.expect("a gang of two");
        ranks.insert(a.rank, (wk.clone(), a.attempt));
    }
    ranks
}

/// `rank0` reports progress until the metrics show it (the endpoint follows running jobs by
/// polling, so the first reports may come before it watches); returns the last step reported.
async fn report_until_shown(
    workers: &mut Workers,
    addr: SocketAddr,
    job_id: &str,
    rank0: &Worker,
    attempt: u32,
) -> u64 {
    let jl = format!("{{job=\"{job_id}\"}}");
    let mut step = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        step += 1;
        let p = v1::Progress { step, total_steps: 10, loss: 2.5, tokens_per_s: 1234.0, ..Default::default() };
        let req = v1::ReportProgressRequest {
            worker_id: rank0.id.clone(),
            job_id: job_id.to_owned(),
            attempt,
            progress: Some(p),
            eval: None,
            worker_secret: rank0.secret.clone(),
        };
        workers.report_progress(req).await.unwrap();
        let m = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
        if get(&m, &format!("bert2bert_job_step{jl}")) == step as f64 {
            assert_eq!(get(&m, &format!("bert2bert_job_loss{jl}")), 2.5);
            assert_eq!(get(&m, &format!("bert2bert_job_tokens_per_second{jl}")), 1234.0);
            return step;
        }
        assert!(tokio::time::Instant::now() < deadline && step < 9, "progress never shown: {m:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The per-call counters after the run: one of each refused or accepted call the test made.
async fn check_rpc_counts(addr: SocketAddr, progress_reports: u64) {
    let m = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
    let rpc = |svc: &str, method: &str, code: &str| {
        let labels = format!("service=\"bert2bert.v1.{svc}\",method=\"{method}\",code=\"{code}\"");
        get(&m, &format!("bert2bert_rpc_requests_total{{{labels}}}"))
    };
    assert_eq!(rpc("JobService", "Submit", "OK"), 1.0);
    assert_eq!(rpc("JobService", "List", "UNAUTHENTICATED"), 1.0);
    assert_eq!(rpc("WorkerService", "Register", "OK"), 2.0);
    assert_eq!(rpc("WorkerService", "GetAssignment", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(rpc("WorkerService", "ReportProgress", "OK"), progress_reports as f64);
    assert_eq!(get(&m, "bert2bert_heartbeat_timeout_losses_total"), 0.0);
}

#[tokio::test]
async fn metrics_follow_jobs_workers_attempts_and_calls() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None, true).await;
    let addr = c.metrics_addr.expect("a metrics address");
    check_refused_requests(addr).await;
    let m = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
    assert_eq!(get(&m, "bert2bert_jobs{state=\"PENDING\"}"), 0.0);
    assert_eq!(get(&m, "bert2bert_workers_alive"), 0.0);

    let channel = Channel::from_shared(c.url()).unwrap().connect().await.unwrap();
    let mut jobs = JobServiceClient::with_interceptor(channel.clone(), Bearer(TOKEN.into()));
    let mut workers = WorkerServiceClient::with_interceptor(channel.clone(), Bearer(TOKEN.into()));
    let mut stranger = JobServiceClient::with_interceptor(channel, Bearer("wrong".into()));
    let job = jobs.submit(v1::SubmitJobRequest { job_yaml: JOB.into() }).await.unwrap().into_inner().job.unwrap();
    assert!(stranger.list(v1::ListJobsRequest::default()).await.is_err());
    let gang = register_workers(&mut workers, &[7001, 7002]).await;
    // Both workers heartbeat until the end, when they fall silent and are lost.
    let (beat_stop, beats) = heartbeat_until_stopped(&workers, &gang);
    let ranks = take_assignments(&mut workers, &gang).await;
    let (rank0, attempt) = ranks[&0].clone();
    scrape_until(addr, "the job runs", |m| {
        get(m, "bert2bert_jobs{state=\"RUNNING\"}") == 1.0
            && get(m, "bert2bert_jobs{state=\"PENDING\"}") == 0.0
            && get(m, "bert2bert_workers_alive") == 2.0
            && get(m, "bert2bert_attempts_started_total") == 1.0
    })
    .await;

    let step = report_until_shown(&mut workers, addr, &job.id, &rank0, attempt).await;
    let commit = v1::CommitCheckpointRequest {
        worker_id: rank0.id.clone(),
        job_id: job.id.clone(),
        attempt,
        step,
        path: format!("/ckpt/step-{step:08}"),
        manifest_sha256: String::new(),
        worker_secret: rank0.secret.clone(),
    };
    workers.commit_checkpoint(commit).await.unwrap();
    let rank1 = &ranks[&1].0;
    let failed = v1::ReportFailedRequest {
        worker_secret: rank1.secret.clone(),
        worker_id: rank1.id.clone(),
        job_id: job.id.clone(),
        attempt,
        step,
        reason: "boom".into(),
        ..Default::default()
    };
    workers.report_failed(failed).await.unwrap();
    let bad = workers.get_assignment(v1::GetAssignmentRequest::default()).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let jl = format!("{{job=\"{}\"}}", job.id);
    scrape_until(addr, "the failure is counted and the job's gauges dropped", |m| {
        get(m, "bert2bert_checkpoints_committed_total") == 1.0
            && get(m, "bert2bert_restarts_total") == 1.0
            && get(m, "bert2bert_jobs{state=\"PENDING\"}") == 1.0
            && !m.contains_key(&format!("bert2bert_job_step{jl}"))
    })
    .await;
    // Goodput of the unfinished job: one failure; no step lost yet (no attempt resumed), and
    // some of its time went into steps.
    let m = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
    assert_eq!(get(&m, &format!("bert2bert_job_failures{jl}")), 1.0);
    assert_eq!(get(&m, &format!("bert2bert_job_steps_lost{jl}")), 0.0);
    let ratio = get(&m, &format!("bert2bert_job_goodput_ratio{jl}"));
    assert!((0.0..=1.0).contains(&ratio), "goodput ratio {ratio}");
    assert!(get(&m, &format!("bert2bert_job_recovering_seconds{jl}")) >= 0.0);
    let status = jobs.get(v1::GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner().job.unwrap();
    let g = status.goodput.expect("goodput once an attempt has run");
    assert_eq!((g.failures, g.steps_lost), (1, 0));
    assert!(g.wall_s > 0.0 && g.productive_s <= g.wall_s, "{g:?}");
    check_rpc_counts(addr, step).await;

    // Silence: both workers are lost to the heartbeat timeout.
    beat_stop.send(true).unwrap();
    beats.await.unwrap();
    scrape_until(addr, "the silent workers are lost", |m| {
        get(m, "bert2bert_heartbeat_timeout_losses_total") == 2.0 && get(m, "bert2bert_workers_alive") == 0.0
    })
    .await;
    c.shutdown().await.unwrap();
}
