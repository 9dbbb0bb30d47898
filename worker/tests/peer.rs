//! Recovery from peers (worker::peer): a state kept in memory and handed over the ring resumes
//! training bit for bit, and a transfer that cannot be made fails on every rank alike.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use kernels::Cpu;
use kernels::collective::Single;
use model::job::JobSpec;
use model::{Variant, checkpoint, init, testing, tokenizer::Tokenizer};
use worker::peer::Snapshot;
use worker::ring::RingCollective;
use worker::state::JobOwner;
use worker::{Event, Trainer};

const TOTAL: u64 = 12;

fn setup(root: &Path) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("peer test seed {seed}");
    let bert = root.join("bert");
    testing::write_bert_dir(&bert, seed, None);
    let tok = Tokenizer::from_file(&bert.join("tokenizer.json")).unwrap();
    let ck = init::warm_start(&bert, Some(&bert), Variant::Bert2Bert, tok.special(), seed).unwrap();
    checkpoint::save_model_dir(&root.join("b2b"), &ck, Some(&tok)).unwrap();
    testing::write_pairs(&root.join("train.jsonl"), 5);
}

/// Dropout on (the default config), so that the replayed masks matter too.
fn job(root: &Path, workers: usize, ckpt: &str) -> JobSpec {
    let text = format!(
        r#"
name: peer-test
model: {{ init: b2b }}
data: {{ train: train.jsonl, max_source_len: 16, max_target_len: 12 }}
training: {{ steps: {TOTAL}, global_batch: 6, micro_batch: 1, lr: 1.0e-3, warmup_steps: 2, label_smoothing: 0.1, precision: fp32, seed: 9 }}
checkpoint: {{ dir: {ckpt}, every_steps: 100, keep: 1 }}
resources: {{ workers: {workers}, device: cpu }}
"#
    );
    JobSpec::from_str(&text, &root.join("job.yaml")).unwrap()
}

fn owner() -> JobOwner {
    JobOwner { name: "peer-test".into(), id: Some("job-1".into()) }
}

/// Runs `f(rank, ring)` on each of `world` ranks of a fresh ring, in threads.
fn on_ring<T: Send>(world: usize, token: u64, f: impl Fn(usize, RingCollective) -> T + Sync) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, f) = (peers.clone(), &f);
                s.spawn(move || {
                    f(rank, RingCollective::connect(rank, world, token, l, &peers, Duration::from_secs(30)).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn single_rank_resumes_from_its_snapshot_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let (mut straight, _) = Trainer::new_owned(&Cpu, &Single, job(root, 1, "a"), owner()).unwrap();
    straight.run(None, 0, &mut |_| {}).unwrap();
    let want = straight.snapshot().unwrap();

    let (mut first, _) = Trainer::new_owned(&Cpu, &Single, job(root, 1, "b"), owner()).unwrap();
    first.run(Some(5), 0, &mut |_| {}).unwrap();
    let held = first.snapshot().unwrap();
    drop(first);
    let mut second = Trainer::new_from_peer(&Cpu, &Single, job(root, 1, "b"), owner(), (0, Some(&held))).unwrap();
    assert_eq!(second.snapshot().unwrap(), held, "the restored state is the held one");
    let mut steps = Vec::new();
    second
        .run(None, 0, &mut |e| {
            if let Event::Step(s) = e {
                steps.push(s.step)
            }
        })
        .unwrap();
    assert_eq!(steps, (6..=TOTAL).collect::<Vec<_>>(), "no step lost or repeated");
    let got = second.snapshot().unwrap();
    assert_eq!(
        (got.step, got.digest()),
        (want.step, want.digest()),
        "resumed from memory differs from the straight run"
    );
    assert_ne!(held.params, want.params, "training went on after the snapshot");
}

/// Two ranks train 4 steps and stop; a new ring of two resumes from rank 1's state alone (rank 0
/// holds none, as a replacement would), and ends bitwise where an uninterrupted ring of two does.
#[test]
fn a_new_ring_resumes_from_one_ranks_state_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let straight = on_ring(2, 1, |_, ring| {
        let (mut t, _) = Trainer::new_owned(&Cpu, &ring, job(root, 2, "a"), owner()).unwrap();
        t.run(None, 0, &mut |_| {}).unwrap();
        t.snapshot().unwrap()
    });
    assert_eq!(straight[0].digest(), straight[1].digest());
    let held = on_ring(2, 2, |_, ring| {
        let (mut t, _) = Trainer::new_owned(&Cpu, &ring, job(root, 2, "b"), owner()).unwrap();
        t.run(Some(4), 0, &mut |_| {}).unwrap();
        t.snapshot().unwrap()
    });
    let survivor = held.into_iter().nth(1).unwrap();
    assert_eq!(survivor.step, 4);
    let resumed = on_ring(2, 3, |rank, ring| {
        let mine = (rank == 1).then_some(&survivor);
        let mut t = Trainer::new_from_peer(&Cpu, &ring, job(root, 2, "b"), owner(), (1, mine)).unwrap();
        assert_eq!(t.step, 4);
        t.run(None, 0, &mut |_| {}).unwrap();
        t.snapshot().unwrap()
    });
    for (rank, got) in resumed.iter().enumerate() {
        assert_eq!((got.step, got.digest()), (TOTAL, straight[0].digest()), "rank {rank} after the handover differs");
    }
}

/// A root that holds nothing, or a state of another length, fails the transfer on every rank
/// promptly (no rank waits for data that never comes).
#[test]
fn a_transfer_that_cannot_be_made_fails_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let errors = on_ring(3, 4, |_, ring| {
        Trainer::new_from_peer(&Cpu, &ring, job(root, 3, "c"), owner(), (2, None)).err().map(|e| e.to_string())
    });
    for e in &errors {
        let e = e.as_deref().expect("the transfer should fail");
        assert!(e.contains("peer state transfer"), "{e}");
    }
    assert!(errors[2].as_deref().unwrap().contains("holds none"), "{errors:?}");
    let short = Snapshot {
        step: 3,
        cursor: Default::default(),
        seed: 9,
        params: vec![0.5; 10],
        adam_m: vec![0.0; 10],
        adam_v: vec![0.0; 10],
    };
    let errors = on_ring(2, 5, |rank, ring| {
        let mine = (rank == 0).then_some(&short);
        Trainer::new_from_peer(&Cpu, &ring, job(root, 2, "c"), owner(), (0, mine)).err().map(|e| e.to_string())
    });
    assert!(errors.iter().all(|e| e.as_deref().is_some_and(|e| e.contains("peer state transfer"))), "{errors:?}");
    // A state trained with another seed is refused on every rank.
    let (t, _) = Trainer::new_owned(&Cpu, &Single, job(root, 1, "d"), owner()).unwrap();
    let mut other = t.snapshot().unwrap();
    drop(t);
    other.seed = 10;
    let errors = on_ring(2, 6, |rank, ring| {
        let mine = (rank == 1).then_some(&other);
        Trainer::new_from_peer(&Cpu, &ring, job(root, 2, "c"), owner(), (1, mine)).err().map(|e| e.to_string())
    });
    assert!(errors.iter().all(|e| e.as_deref().is_some_and(|e| e.contains("seed 10"))), "{errors:?}");
}
