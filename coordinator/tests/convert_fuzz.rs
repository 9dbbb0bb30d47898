//! Property tests of every proto-to-domain conversion (coordinator/src/convert.rs) on arbitrary
//! requests: each returns Ok or an INVALID_ARGUMENT naming a field, never panics, and what it
//! accepts keeps the conversion's promises. Requests are built from raw protobuf wire bytes
//! ("field soups": any field number, wire type and value, nested once), so every field of every
//! message gets arbitrary ints, strings and bytes without this file naming the fields; the job
//! file and the List paging fields also get targeted strategies.
//!
//! Each property prints how many cases it ran (and how many soups decoded into the message);
//! the counts are bounded so the whole file runs in seconds.

use std::fmt::Debug;

use coordinator::Error;
use coordinator::convert::{
    AssignmentPoll, Cancel, Commit, Deregister, Done, Failed, Heartbeat, JobId, ListPage, MAX_PAGE_SIZE, MAX_WAIT_MS,
    ReportProgress, Submit,
};
use coordinator::workers::Registration;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use proto::v1;

/// One protobuf field: number and a value of one of the wire types.
#[derive(Clone, Debug)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        let (n, wire) = match f {
            Field::Varint(n, _) => (n, 0),
            Field::Fixed64(n, _) => (n, 1),
            Field::Bytes(n, _) => (n, 2),
            Field::Fixed32(n, _) => (n, 5),
        };
        varint(u64::from(*n) << 3 | wire, &mut out);
        match f {
            Field::Varint(_, v) => varint(*v, &mut out),
            Field::Fixed64(_, v) => out.extend_from_slice(&v.to_le_bytes()),
            Field::Fixed32(_, v) => out.extend_from_slice(&v.to_le_bytes()),
            Field::Bytes(_, b) => {
                varint(b.len() as u64, &mut out);
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// Strings a request field may plausibly carry, and hostile ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,20}",
        "job-[0-9]{1,22}",
        "[0-9]{0,25}",
        ".{0,40}",
        "[ \t\n]{0,4}[A-Za-z0-9:/]{0,10}",
        (0usize..3000).prop_map(|n| "x".repeat(n)),
        "[0-9a-f:.\\[\\]]{0,30}",
    ]
}

fn value(n: u32) -> impl Strategy<Value = Field> {
    let small = prop_oneof![0u64..10, any::<u64>(), Just(u64::from(u32::MAX)), Just(u64::MAX)];
    prop_oneof![
        small.prop_map(move |v| Field::Varint(n, v)),
        any::<u64>().prop_map(move |v| Field::Fixed64(n, v)),
        any::<u32>().prop_map(move |v| Field::Fixed32(n, v)),
        text().prop_map(move |s| Field::Bytes(n, s.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..160).prop_map(move |b| Field::Bytes(n, b)),
    ]
}

/// A message's wire bytes: up to 7 fields numbered 1 to 14, values possibly nested messages.
fn soup() -> impl Strategy<Value = Vec<u8>> {
    let field = (1u32..15).prop_flat_map(value);
    let nested = (1u32..15, proptest::collection::vec((1u32..10).prop_flat_map(value), 0..5))
        .prop_map(|(n, inner)| Field::Bytes(n, encode(&inner)));
    proptest::collection::vec(prop_oneof![3 => field, 1 => nested], 0..8).prop_map(|f| encode(&f))
}

/// An error must be INVALID_ARGUMENT whose message starts with a field path: `a.b[2].c: ...`.
fn names_a_field(e: &Error) -> Result<(), TestCaseError> {
    let Error::InvalidArgument(m) = e else { return Err(TestCaseError::fail(format!("not INVALID_ARGUMENT: {e:?}"))) };
    let field = m.split(": ").next().unwrap_or("");
    let ok = !field.is_empty()
        && m.len() > field.len()
        && field.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '[' | ']'));
    prop_assert!(ok, "no field named: {m}");
    Ok(())
}

fn valid_id(id: &str) -> bool {
    (1..=256).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Runs `check` on `cases` requests decoded from soups; prints and checks the count.
fn fuzz<M: Message + Default + Debug>(name: &str, cases: u32, check: impl Fn(M) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let (ran, decoded) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    runner
        .run(&soup(), |bytes| {
            ran.set(ran.get() + 1);
            // Bytes that are no message of this type are refused by tonic before convert runs.
            let Ok(m) = M::decode(bytes.as_slice()) else { return Ok(()) };
            decoded.set(decoded.get() + 1);
            check(m)
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {} cases, {} decoded", ran.get(), decoded.get());
    assert!(ran.get() >= cases && decoded.get() > cases / 10, "{name}: too few cases ran");
}

/// Ok must satisfy `ok`; Err must name a field.
fn either<T>(r: coordinator::Result<T>, ok: impl FnOnce(T) -> bool) -> Result<(), TestCaseError> {
    match r {
        Ok(v) => {
            prop_assert!(ok(v), "accepted a value it should not have");
            Ok(())
        }
        Err(e) => names_a_field(&e),
    }
}

const CASES: u32 = 1500;

#[test]
fn job_service_requests() {
    fuzz("GetJobRequest", CASES, |m: v1::GetJobRequest| either(JobId::try_from(m), |JobId(id)| valid_id(&id)));
    fuzz("WatchJobRequest", CASES, |m: v1::WatchJobRequest| either(JobId::try_from(m), |JobId(id)| valid_id(&id)));
    fuzz("DeleteJobRequest", CASES, |m: v1::DeleteJobRequest| either(JobId::try_from(m), |JobId(id)| valid_id(&id)));
    fuzz("CancelJobRequest", CASES, |m: v1::CancelJobRequest| {
        either(Cancel::try_from(m), |c| valid_id(&c.job_id) && c.reason.len() <= 256)
    });
    fuzz("ListJobsRequest", CASES, |m: v1::ListJobsRequest| {
        let token = m.page_token.clone();
        either(ListPage::try_from(m), |p| {
            (1..=MAX_PAGE_SIZE).contains(&p.filter.limit)
                && p.before.is_some() != token.is_empty()
                && p.before.is_none_or(|b| b > 0 && b.to_string() == token)
        })
    });
    fuzz("SubmitJobRequest", 300, |m: v1::SubmitJobRequest| either(Submit::try_from(m), |_| true));
}

#[test]
fn worker_service_requests() {
    fuzz("RegisterWorkerRequest", CASES, |m: v1::RegisterWorkerRequest| {
        either(Registration::try_from(m), |r| r.hostname.len() <= 256 && r.version.len() <= 256)
    });
    fuzz("HeartbeatRequest", CASES, |m: v1::HeartbeatRequest| {
        either(Heartbeat::try_from(m), |h| valid_id(&h.worker_id))
    });
    fuzz("GetAssignmentRequest", CASES, |m: v1::GetAssignmentRequest| {
        either(AssignmentPoll::try_from(m), |p| valid_id(&p.worker_id) && p.wait_ms <= MAX_WAIT_MS)
    });
    fuzz("ReportProgressRequest", CASES, |m: v1::ReportProgressRequest| either(ReportProgress::try_from(m), |_| true));
    fuzz("CommitCheckpointRequest", CASES, |m: v1::CommitCheckpointRequest| either(Commit::try_from(m), |_| true));
    fuzz("ReportDoneRequest", CASES, |m: v1::ReportDoneRequest| either(Done::try_from(m), |_| true));
    fuzz("ReportFailedRequest", CASES, |m: v1::ReportFailedRequest| either(Failed::try_from(m), |_| true));
    fuzz("DeregisterRequest", CASES, |m: v1::DeregisterRequest| either(Deregister::try_from(m), |_| true));
}

/// Job files: YAML-shaped text around the real keys, and arbitrary text. Accepted specs must
/// read back equal from their own YAML (what the coordinator stores and workers parse).
#[test]
fn job_files() {
    let key = prop_oneof![
        Just("name"),
        Just("model"),
        Just("init"),
        Just("data"),
        Just("train"),
        Just("training"),
        Just("steps"),
        Just("global_batch"),
        Just("resources"),
        Just("workers"),
        Just("device"),
        Just("max_source_len"),
    ];
    let atom = prop_oneof![
        "[a-z0-9/._-]{0,12}",
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(": ".to_owned()),
        Just(", ".to_owned()),
        Just("\n".to_owned()),
        Just("\n  ".to_owned()),
        Just("- ".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("|\n".to_owned()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        key.clone().prop_map(|k| format!("{k}: ")),
    ];
    let yamlish = proptest::collection::vec(atom, 0..60).prop_map(|v| v.concat());
    let base = "name: t\nmodel: { init: /m }\ndata: { train: /d.jsonl }\ntraining: { steps: 10, global_batch: 4 }\n";
    let mutated = (yamlish.clone(), 0..base.len()).prop_map(move |(s, at)| {
        let at = (0..=at).rev().find(|&i| base.is_char_boundary(i)).unwrap_or(0);
        format!("{}{s}{}", &base[..at], &base[at..])
    });
    let text = prop_oneof![2 => yamlish, 2 => mutated, 1 => ".{0,300}"];
    let cases = 600;
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let accepted = std::cell::Cell::new(0u32);
    runner
        .run(&text, |job_yaml| {
            match Submit::try_from(v1::SubmitJobRequest { job_yaml }) {
                Ok(Submit(spec)) => {
                    accepted.set(accepted.get() + 1);
                    let again = jobspec::JobSpec::from_str(&spec.to_yaml(), std::path::Path::new("job_yaml"));
                    let again = again.ok();
                    prop_assert_eq!(again.as_ref(), Some(&spec));
                }
                Err(e) => names_a_field(&e)?,
            }
            Ok(())
        })
        .unwrap();
    eprintln!("job files: {cases} cases, {} accepted", accepted.get());
    assert!(accepted.get() > 0, "no generated job file was valid: the generator is too weak");
}
