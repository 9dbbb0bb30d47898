//! Gradient buckets all-reduced during backward change nothing: after a few steps on ring ranks
//! the parameters are bitwise those of one all-reduce after backward, for 2 and 3 ranks (with 3,
//! sums are only the same because bucket starts are aligned to the ring's blocks).

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use kernels::{Cpu, Memory};
use model::job::JobSpec;
use model::{Variant, checkpoint, init, testing, tokenizer::Tokenizer};
use worker::Trainer;
use worker::ring::RingCollective;

fn setup(root: &Path, variant: Variant) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("buckets test seed {seed}");
    let bert = root.join("bert");
    testing::write_bert_dir(&bert, seed, None);
    let tok = Tokenizer::from_file(&bert.join("tokenizer.json")).unwrap();
    let ck = init::warm_start(&bert, Some(&bert), variant, tok.special(), seed).unwrap();
    checkpoint::save_model_dir(&root.join("b2b"), &ck, Some(&tok)).unwrap();
    testing::write_pairs(&root.join("train.jsonl"), 3);
}

fn job(root: &Path, workers: usize, ckpt: &str) -> JobSpec {
    let text = format!(
        r#"
name: buckets
model: {{ init: b2b }}
data: {{ train: train.jsonl, max_source_len: 16, max_target_len: 12 }}
training: {{ steps: 4, global_batch: 12, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, label_smoothing: 0.1, precision: fp32, seed: 5 }}
checkpoint: {{ dir: {ckpt}, every_steps: 100, keep: 1 }}
resources: {{ workers: {workers}, device: cpu }}
"#
    );
    JobSpec::from_str(&text, &root.join("job.yaml")).unwrap()
}

/// Train on `world` ring ranks with `bucket_mb`; every rank's parameters and bucket count.
fn train(root: &Path, world: usize, bucket_mb: f64, ckpt: &str) -> Vec<(Vec<f32>, usize)> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                let spec = job(root, world, &format!("{ckpt}_{world}_{rank}"));
                s.spawn(move || {
                    let t = Duration::from_secs(60);
                    let ring = RingCollective::connect(rank, world, 8, listener, &peers, t).unwrap();
                    let (mut tr, _) = Trainer::new(&Cpu, &ring, spec).unwrap();
                    tr.grad_bucket_mb = bucket_mb;
                    tr.run(None, 0, &mut |_| {}).unwrap();
                    let n = tr.net.table.storage_len;
                    (Cpu.download(Cpu.view(&tr.net.params, 0..n)).unwrap(), tr.grad_bucket_count())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(variant: Variant) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, variant);
    for world in [2, 3] {
        let whole = train(root, world, 0.0, "whole");
        // 0.004 MB = 1000 values: several buckets even in the tiny model.
        let bucketed = train(root, world, 0.004, "bucketed");
        assert_eq!(whole[0].1, 0, "grad_bucket_mb 0 must not bucket");
        let buckets = bucketed[0].1;
        assert!(buckets >= 3, "{world} ranks: only {buckets} buckets");
        for (r, (p, _)) in bucketed.iter().enumerate() {
            let bad = p.iter().zip(&whole[0].0).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(bad.is_none(), "{world} ranks, rank {r}: bucketed parameters differ at {bad:?}");
            assert_eq!(p, &whole[r].0);
        }
        eprintln!("{variant:?}, {world} ranks: {buckets} buckets, bitwise equal");
    }
}

#[test]
fn bucketed_all_reduce_is_bitwise_the_whole_one_bert2bert() {
    check(Variant::Bert2Bert);
}

#[test]
fn bucketed_all_reduce_is_bitwise_the_whole_one_bertshare() {
    check(Variant::BertShare);
}
