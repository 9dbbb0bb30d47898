//! Data-parallel equivalence: 2 ranks (TCP ring) with micro-batch b give the same parameters as
//! 1 rank with micro-batch 2b at the same global batch and seed, after 10 steps. Dropout is off
//! (its masks are keyed on the micro-batch, which differs between the two layouts).

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use kernels::collective::Single;
use kernels::{Cpu, Memory};
use model::job::JobSpec;
use model::{Variant, checkpoint, init, testing, tokenizer::Tokenizer};
use worker::Trainer;
use worker::ring::RingCollective;

fn setup(root: &Path) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("equivalence test seed {seed}");
    let bert = root.join("bert");
    testing::write_bert_dir(&bert, seed, None);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bert.join("config.json")).unwrap()).unwrap();
    cfg["hidden_dropout_prob"] = 0.0.into();
    cfg["attention_probs_dropout_prob"] = 0.0.into();
    std::fs::write(bert.join("config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_file(&bert.join("tokenizer.json")).unwrap();
    let ck = init::warm_start(&bert, Some(&bert), Variant::Bert2Bert, tok.special(), seed).unwrap();
    checkpoint::save_model_dir(&root.join("b2b"), &ck, Some(&tok)).unwrap();
    testing::write_pairs(&root.join("train.jsonl"), 3);
}

fn job(root: &Path, workers: usize, micro: usize, ckpt: &str) -> JobSpec {
    let text = format!(
        r#"
name: equivalence
model: {{ init: b2b }}
data: {{ train: train.jsonl, max_source_len: 16, max_target_len: 12 }}
training: {{ steps: 10, global_batch: 8, micro_batch: {micro}, lr: 1.0e-3, warmup_steps: 2, label_smoothing: 0.1, precision: fp32, seed: 11 }}
checkpoint: {{ dir: {ckpt}, every_steps: 100, keep: 1 }}
resources: {{ workers: {workers}, device: cpu }}
"#
    );
    JobSpec::from_str(&text, &root.join("job.yaml")).unwrap()
}

#[test]
fn two_ranks_equal_one_rank_with_twice_the_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);

    let (mut single, _) = Trainer::new(&Cpu, &Single, job(root, 1, 4, "ckpt1")).unwrap();
    single.run(None, 0, &mut |_| {}).unwrap();
    let n = single.net.table.storage_len;
    let want = Cpu.download(Cpu.view(&single.net.params, 0..n)).unwrap();

    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                let spec = job(root, 2, 2, "ckpt2");
                s.spawn(move || {
                    let ring = RingCollective::connect(rank, 2, 99, listener, &peers, Duration::from_secs(30)).unwrap();
                    let (mut t, _) = Trainer::new(&Cpu, &ring, spec).unwrap();
                    t.run(None, 0, &mut |_| {}).unwrap();
                    Cpu.download(Cpu.view(&t.net.params, 0..n)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0], results[1], "both ranks hold identical parameters");
    let model::testing::ParamDiff { worst, worst_name, worst_key_bias } =
        model::testing::param_diff(&single.net.table, &want, &results[0]);
    eprintln!("max relative difference 1 rank vs 2 ranks: {worst:e} ({worst_name}); key biases {worst_key_bias:e}");
    assert!(worst < 1e-5, "1 rank and 2 ranks differ by {worst:e} in {worst_name}");
    assert!(worst_key_bias < 1e-2, "key biases differ by {worst_key_bias:e}");
    // Training moved the parameters, so equality is not trivial.
    let moved = want
        .iter()
        .zip(
            &Cpu.download(Cpu.view(&Trainer::new(&Cpu, &Single, job(root, 1, 4, "fresh")).unwrap().0.net.params, 0..n))
                .unwrap(),
        )
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > n / 2, "only {moved} of {n} parameters changed in 10 steps");
}
