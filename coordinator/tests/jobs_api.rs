//! JobService limits over real gRPC on 127.0.0.1:0: List pages and their caps, DeleteJob, and
//! hostile job files that must not stall other clients (issue 11 items 3 and 6).

use std::path::Path;
use std::time::{Duration, Instant};

use coordinator::{Config, Running};
use prost::Message;
use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "client-secret";

#[derive(Clone)]
struct Bearer;

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        Ok(req)
    }
}

type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;

async fn start(state: &Path) -> Running {
    coordinator::start(Config::new("127.0.0.1:0".parse().unwrap(), state, TOKEN)).await.expect("coordinator starts")
}

async fn client(c: &Running) -> Jobs {
    let channel = Channel::from_shared(c.url()).unwrap().connect().await.expect("connect");
    // Large enough to receive a page that broke the byte budget, so the test sees it.
    JobServiceClient::with_interceptor(channel, Bearer).max_decoding_message_size(64 << 20)
}

/// A job file whose spec is about `bytes` long (a long data path; nothing is read at submit).
fn job(name: &str, bytes: usize) -> String {
    let pad = "d/".repeat(bytes / 2);
    format!(
        "name: {name}\nmodel: {{ init: /models/m }}\ndata: {{ train: /data/{pad}train.jsonl }}\n\
         training: {{ steps: 10, global_batch: 4 }}\nresources: {{ workers: 1, device: cpu }}\n"
    )
}

async fn submit(j: &mut Jobs, yaml: String) -> Result<v1::Job, Status> {
    Ok(j.submit(v1::SubmitJobRequest { job_yaml: yaml }).await?.into_inner().job.unwrap())
}

async fn page(j: &mut Jobs, req: v1::ListJobsRequest) -> v1::ListJobsResponse {
    j.list(req).await.unwrap().into_inner()
}

/// Every page from the first, with the page size asked for; the pages' job counts.
async fn all_pages(j: &mut Jobs, page_size: u32) -> (Vec<v1::Job>, Vec<usize>) {
    let (mut jobs, mut sizes, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let req = v1::ListJobsRequest { page_size, page_token: token, ..Default::default() };
        let p = page(j, req).await;
        assert!(p.encoded_len() < 1 << 20, "a page of {} bytes", p.encoded_len());
        sizes.push(p.jobs.len());
        jobs.extend(p.jobs);
        if p.next_page_token.is_empty() {
            return (jobs, sizes);
        }
        token = p.next_page_token;
    }
}

#[tokio::test]
async fn list_pages_through_more_jobs_than_one_page_holds() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = client(&c).await;
    let mut ids = Vec::new();
    for i in 0..205 {
        ids.push(submit(&mut j, job(&format!("j{i}"), 0)).await.unwrap().id);
    }
    ids.reverse(); // newest first
    let (jobs, sizes) = all_pages(&mut j, 0).await;
    assert_eq!(sizes, [100, 100, 5], "the default page is the cap");
    assert_eq!(jobs.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), ids);
    let (_, sizes) = all_pages(&mut j, 1000).await;
    assert_eq!(sizes, [100, 100, 5], "page_size is capped at 100");
    let (jobs, sizes) = all_pages(&mut j, 64).await;
    assert_eq!((sizes, jobs.len()), (vec![64, 64, 64, 13], 205));
    // The old `limit` is page_size's alias.
    let p = page(&mut j, v1::ListJobsRequest { limit: 7, ..Default::default() }).await;
    assert_eq!(p.jobs.len(), 7);
    assert!(!p.next_page_token.is_empty());
    // States filter across pages.
    for id in ids.iter().step_by(8) {
        j.cancel(v1::CancelJobRequest { job_id: id.clone(), reason: String::new() }).await.unwrap();
    }
    let cancelled = v1::JobState::Cancelled as i32;
    let (mut got, mut token) = (Vec::new(), String::new());
    loop {
        let req =
            v1::ListJobsRequest { states: vec![cancelled], page_size: 10, page_token: token, ..Default::default() };
        let p = page(&mut j, req).await;
        got.extend(p.jobs.into_iter().map(|x| x.id));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(got, ids.iter().step_by(8).cloned().collect::<Vec<_>>());
    for bad in ["x", "-1", "0", "007", &"9".repeat(40)] {
        let req = v1::ListJobsRequest { page_token: bad.into(), ..Default::default() };
        let e = j.list(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert!(e.message().starts_with("page_token: "), "{}", e.message());
    }
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_pages_stay_small_whatever_the_jobs_hold() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = client(&c).await;
    // 80 jobs of 15 KiB specs (listed whole: 1.2 MB together) and 3 of 60 KiB (left out).
    let big: Vec<String> =
        submit_all(&mut j, (0..3).map(|i| job(&format!("big{i}"), 60 << 10)).collect::<Vec<_>>()).await;
    let mid = submit_all(&mut j, (0..80).map(|i| job(&format!("mid{i}"), 15 << 10)).collect::<Vec<_>>()).await;
    let (jobs, sizes) = all_pages(&mut j, 100).await;
    assert_eq!(jobs.len(), 83);
    assert!(sizes[0] < 80, "the first page stopped at the byte budget: {sizes:?}");
    for x in &jobs {
        let huge = big.contains(&x.id);
        assert_eq!(x.spec_yaml_omitted, huge, "{}", x.id);
        assert_eq!(x.spec_yaml.is_empty(), huge, "{}", x.id);
        assert!(huge || mid.contains(&x.id));
    }
    // Get has the whole spec.
    let whole = j.get(v1::GetJobRequest { job_id: big[0].clone() }).await.unwrap().into_inner().job.unwrap();
    assert!(whole.spec_yaml.len() > 60 << 10 && !whole.spec_yaml_omitted);
    c.shutdown().await.unwrap();
}

async fn submit_all(j: &mut Jobs, files: Vec<String>) -> Vec<String> {
    let mut ids = Vec::new();
    for f in files {
        ids.push(submit(j, f).await.unwrap().id);
    }
    ids
}

#[tokio::test]
async fn delete_forgets_ended_jobs_only_and_never_reuses_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    let mut j = client(&c).await;
    let keep = submit(&mut j, job("keep", 0)).await.unwrap();
    let gone = submit(&mut j, job("gone", 0)).await.unwrap();
    let delete = |id: &str| v1::DeleteJobRequest { job_id: id.into() };
    let e = j.delete_job(delete(&gone.id)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a PENDING job: {e:?}");
    assert!(e.message().contains("PENDING"), "{}", e.message());
    j.cancel(v1::CancelJobRequest { job_id: gone.id.clone(), reason: String::new() }).await.unwrap();
    j.delete_job(delete(&gone.id)).await.unwrap();
    let e = j.get(v1::GetJobRequest { job_id: gone.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(j.delete_job(delete(&gone.id)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(j.delete_job(delete("")).await.unwrap_err().code(), Code::InvalidArgument);
    let listed = page(&mut j, v1::ListJobsRequest::default()).await.jobs;
    assert_eq!(listed.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), [keep.id.as_str()]);
    let next = submit(&mut j, job("next", 0)).await.unwrap();
    assert!(next.id != gone.id && next.id != keep.id, "{} reuses an id", next.id);
    c.shutdown().await.unwrap();
}

/// The longest List call while `flood` runs on other connections.
async fn slowest_list_during(c: &Running, flood: impl std::future::Future<Output = ()>) -> Duration {
    let mut lister = client(c).await;
    let done = std::sync::atomic::AtomicBool::new(false);
    let lists = async {
        let mut slowest = Duration::ZERO;
        // At least a few calls, then until the flood ends.
        let mut n = 0;
        while n < 5 || !done.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(30), lister.list(v1::ListJobsRequest::default())).await;
            r.expect("List hung").expect("List failed");
            slowest = slowest.max(t.elapsed());
            n += 1;
            tokio::task::yield_now().await;
        }
        slowest
    };
    let flood = async {
        flood.await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    tokio::join!(lists, flood).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_yaml_flood_is_refused_and_list_stays_fast() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;
    // The reproduction (200 KB: over the size limit) and one under the size limit that
    // only the depth limit stops, each sent 8 times at once from their own connections.
    let oversized = format!("name: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep = format!("name: {}{}", "[".repeat(30_000), "]".repeat(30_000));
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(client(&c).await);
    }
    let codes = std::sync::Mutex::new(Vec::new());
    let flood = async {
        let calls = clients.iter_mut().enumerate().map(|(i, cl)| {
            let yaml = if i % 2 == 0 { oversized.clone() } else { deep.clone() };
            let codes = &codes;
            async move {
                let e = submit(cl, yaml).await.expect_err("a flood is refused");
                codes.lock().unwrap().push((i % 2, e.code(), e.message().to_owned()));
            }
        });
        futures_join_all(calls).await;
    };
    let slowest = slowest_list_during(&c, flood).await;
    eprintln!("slowest List during the flood: {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "List took {slowest:?} during the flood");
    let codes = codes.into_inner().unwrap();
    assert_eq!(codes.len(), 16);
    for (kind, code, msg) in codes {
        assert!(msg.starts_with("job_yaml: "), "{msg}");
        match (kind, code) {
            (0, Code::InvalidArgument) => assert!(msg.contains("65536"), "names the size limit: {msg}"),
            (1, Code::InvalidArgument) => assert!(msg.contains("nesting deeper than"), "names the limit: {msg}"),
            (1, Code::ResourceExhausted) => {}
            other => panic!("{other:?}: {msg}"),
        }
    }
    // Nothing was stored, and the coordinator still takes a good job.
    let mut j = client(&c).await;
    assert!(page(&mut j, v1::ListJobsRequest::default()).await.jobs.is_empty());
    submit(&mut j, job("fine", 0)).await.unwrap();
    c.shutdown().await.unwrap();
}

/// Runs futures concurrently on this task (no extra crate for join_all).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
}

#[tokio::test]
async fn a_zero_length_store_file_stops_the_coordinator_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.sqlite");
    std::fs::write(&file, b"").unwrap();
    let e = coordinator::start(Config::new("127.0.0.1:0".parse().unwrap(), dir.path(), TOKEN)).await.err().unwrap();
    assert!(matches!(e, coordinator::Error::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");
}

#[tokio::test]
async fn lengths_past_the_models_positions_are_refused_when_the_coordinator_sees_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("state")).await;
    let mut j = client(&c).await;
    // The tiny BERT of model::testing, whose config has 64 positions.
    let bert = dir.path().join("bert");
    std::fs::create_dir_all(&bert).unwrap();
    let config = model::testing::bert_config();
    assert_eq!(config["max_position_embeddings"], 64);
    std::fs::write(bert.join("config.json"), config.to_string()).unwrap();
    let with = |encoder: &Path, src: usize| {
        format!(
            "name: t\nmodel: {{ encoder: {}, decoder: random }}\n\
             data: {{ train: /d.jsonl, max_source_len: {src}, max_target_len: 8 }}\n\
             training: {{ steps: 10, global_batch: 4 }}\n",
            encoder.display()
        )
    };
    submit(&mut j, with(&bert, 64)).await.unwrap();
    let e = submit(&mut j, with(&bert, 65)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("job_yaml: data.max_source_len: 65"), "{}", e.message());
    assert!(e.message().contains("max_position_embeddings (64"), "{}", e.message());
    // A model only the workers can see is not checked here.
    submit(&mut j, with(&dir.path().join("elsewhere"), 65)).await.unwrap();
    c.shutdown().await.unwrap();
}
