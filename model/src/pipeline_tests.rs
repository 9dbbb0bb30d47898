use crate::data::Special;
use std::collections::{BTreeSet, HashMap};

use super::*;

const SP: Special = Special { cls: 101, sep: 102, pad: 0 };

/// Lengths 1..=60 in a scrambled order.
fn lengths(n: usize) -> Vec<u32> {
    (0..n as u64).map(|i| 1 + (kernels::rng::mix(7, i) % 60) as u32).collect()
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v
}

#[test]
fn shuffle_is_a_deterministic_uniform_permutation() {
    let mut a: Vec<u32> = (0..100).collect();
    let mut b = a.clone();
    shuffle(&mut a, 9);
    shuffle(&mut b, 9);
    assert_eq!(a, b);
    assert_ne!(a, (0..100).collect::<Vec<_>>());
    assert_eq!(sorted(a.iter().map(|&x| x as usize).collect()), (0..100).collect::<Vec<_>>());
    // All 6 orders of 3 items come up about equally often.
    let mut counts: HashMap<[u8; 3], u32> = HashMap::new();
    for key in 0..60_000 {
        let mut v = [0u8, 1, 2];
        shuffle(&mut v, key);
        *counts.entry(v).or_default() += 1;
    }
    assert_eq!(counts.len(), 6);
    assert!(counts.values().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    let mut empty: [u8; 0] = [];
    shuffle(&mut empty, 1);
}

#[test]
fn order_is_deterministic_per_seed_and_epoch() {
    let s = Sampler::new(lengths(500), 16, 42).unwrap();
    let again = Sampler::new(lengths(500), 16, 42).unwrap();
    let e0: Vec<Vec<usize>> = s.epoch(0).batches().map(<[usize]>::to_vec).collect();
    assert_eq!(e0, again.epoch(0).batches().map(<[usize]>::to_vec).collect::<Vec<_>>());
    assert_ne!(e0, s.epoch(1).batches().map(<[usize]>::to_vec).collect::<Vec<_>>());
    let other_seed = Sampler::new(lengths(500), 16, 43).unwrap();
    assert_ne!(e0, other_seed.epoch(0).batches().map(<[usize]>::to_vec).collect::<Vec<_>>());
    assert_eq!(s.batch_at(Cursor { epoch: 0, step_in_epoch: 5 }), e0[5]);
    // A cursor past the epoch's end is the next epoch's.
    assert_eq!(s.batch_at(Cursor { epoch: 0, step_in_epoch: 31 + 2 }), s.epoch(1).batch(2));
}

#[test]
fn every_example_once_per_epoch_dropping_the_incomplete_batch() {
    for (n, g, bucket) in [(1000, 16, 50), (960, 16, 50), (1000, 16, 0), (37, 37, 50), (100, 7, 3)] {
        let s = Sampler::new(lengths(n), g, 5).unwrap().with_bucket_batches(bucket);
        assert_eq!(s.steps_per_epoch(), (n / g) as u64);
        let mut seen_over_epochs = BTreeSet::new();
        for e in 0..4 {
            let ep = s.epoch(e);
            assert_eq!(ep.steps(), n / g);
            assert!(ep.batches().all(|b| b.len() == g));
            let all: Vec<usize> = ep.batches().flatten().copied().collect();
            let set: BTreeSet<usize> = all.iter().copied().collect();
            assert_eq!(set.len(), all.len(), "n {n} g {g}: an example appears twice in epoch {e}");
            assert_eq!(all.len(), (n / g) * g);
            assert!(set.iter().all(|&i| i < n));
            seen_over_epochs.extend(set);
        }
        // A different tail is dropped each epoch.
        assert_eq!(seen_over_epochs.len(), n, "n {n} g {g}");
    }
}

#[test]
fn batches_are_length_buckets_in_random_order() {
    let lens = lengths(16 * 200);
    let s = Sampler::new(lens.clone(), 16, 1).unwrap();
    let spread = |b: &[usize]| {
        let l: Vec<u32> = b.iter().map(|&i| lens[i]).collect();
        l.iter().max().unwrap() - l.iter().min().unwrap()
    };
    let ep = s.epoch(0);
    let mean_spread = ep.batches().map(|b| spread(b) as f64).sum::<f64>() / ep.steps() as f64;
    let plain = s.clone().with_bucket_batches(0).epoch(0);
    let plain_spread = plain.batches().map(|b| spread(b) as f64).sum::<f64>() / plain.steps() as f64;
    assert!(mean_spread < 0.1 * plain_spread, "bucketed spread {mean_spread} vs random {plain_spread}");
    // The batch order is not a ramp of lengths.
    let firsts: Vec<u32> = ep.batches().map(|b| lens[b[0]]).collect();
    assert!(firsts.windows(2).any(|w| w[0] > w[1]) && firsts.windows(2).any(|w| w[0] < w[1]));
}

/// Padded tokens (source and target) per micro-batch over one epoch.
fn mean_padding(data: &Dataset, sampler: &Sampler, micro: usize, max: usize) -> f64 {
    let (mut pad, mut count) = (0usize, 0usize);
    for b in sampler.epoch(0).batches() {
        for m in shard(b, micro, 0, 1) {
            let batch = data.batch(m, SP, max, max).unwrap();
            let real_src = batch.src_mask.iter().filter(|&&x| x > 0.0).count();
            pad += batch.batch * (batch.src_len + batch.tgt_len) - real_src - batch.label_tokens();
            count += 1;
        }
    }
    pad as f64 / count as f64
}

#[test]
fn bucketing_cuts_padding_on_the_kjv_sample() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("examples/data/kjv_web_sample/train.jsonl");
    let tok_path = root.join("models/minilm-b2b/tokenizer.json");
    let data = if tok_path.is_file() {
        Dataset::load(&path, &Tokenizer::from_file(&tok_path).unwrap(), "source", "target").unwrap()
    } else {
        // Without the (untracked) model, one id per whitespace word stands in for the tokenizer.
        eprintln!("note: {} absent; counting words instead of tokens", tok_path.display());
        let pairs = read_pairs(&path, "source", "target").unwrap();
        let words = |s: &str| s.split_whitespace().map(|_| 1000).collect::<Vec<i32>>();
        let (src, tgt) = pairs.iter().map(|p| (words(&p.source), words(&p.target))).unzip();
        Dataset::from_ids(src, tgt, &path).unwrap()
    };
    assert!(data.len() >= 1000, "the committed sample has {} pairs", data.len());
    let sampler = data.sampler(16, 42, 64, 64).unwrap();
    let bucketed = mean_padding(&data, &sampler, 16, 64);
    let random = mean_padding(&data, &sampler.clone().with_bucket_batches(0), 16, 64);
    eprintln!("kjv sample, batch 16: mean padded tokens per batch {bucketed:.1} bucketed vs {random:.1} random");
    assert!(bucketed < 0.25 * random, "bucketed {bucketed} vs random {random}");
}

#[test]
fn shards_cover_the_global_batch_for_any_world_size() {
    let s = Sampler::new(lengths(400), 16, 3).unwrap();
    for gb in s.batches_from(Cursor::default()).take(30) {
        for (micro, worlds) in [(4, &[1, 2, 4][..]), (2, &[1, 2, 4, 8][..]), (16, &[1][..]), (4, &[3][..])] {
            for &world in worlds {
                let mut union = Vec::new();
                for rank in 0..world {
                    let mine = shard(&gb.indices, micro, rank, world);
                    // Every rank runs the same count when world divides the micro-batches.
                    let per_rank = (16 / micro).div_ceil(world);
                    assert!(mine.len() == per_rank || (16 / micro) % world != 0 && mine.len() == per_rank - 1);
                    assert!(mine.iter().all(|m| m.len() == micro));
                    union.extend(mine.into_iter().flatten().copied());
                }
                assert_eq!(sorted(union), sorted(gb.indices.clone()), "micro {micro} world {world}");
            }
        }
    }
    assert!(shard(&[1, 2, 3], 2, 1, 1).is_empty() && shard(&[1, 2, 3], 0, 0, 1).is_empty());
    assert_eq!(shard(&[1, 2, 3], 2, 0, 1), vec![&[1, 2][..], &[3][..]]);
}

#[test]
fn resuming_from_a_cursor_continues_the_same_sequence() {
    let s = Sampler::new(lengths(100), 16, 11).unwrap(); // 6 steps per epoch, 4 examples dropped
    let run: Vec<GlobalBatch> = s.batches_from(Cursor::default()).take(20).collect();
    assert_eq!(run[6].cursor, Cursor { epoch: 1, step_in_epoch: 0 });
    assert_eq!(run[5].next, run[6].cursor);
    for (k, gb) in run.iter().enumerate() {
        assert_eq!(gb.cursor, s.cursor_at(k as u64));
        assert_eq!(gb.indices, s.batch_at(gb.cursor));
    }
    for k in [0, 1, 5, 6, 7, 13] {
        let saved = serde_json::to_string(&run[k].next).unwrap();
        let cursor: Cursor = serde_json::from_str(&saved).unwrap();
        let resumed: Vec<GlobalBatch> = s.batches_from(cursor).take(20 - k - 1).collect();
        assert_eq!(resumed, run[k + 1..], "resume after step {k}");
    }
    assert_eq!(serde_json::to_string(&run[8].cursor).unwrap(), r#"{"epoch":1,"step_in_epoch":2}"#);
    // A cursor written past its epoch's end rolls over.
    let late: Vec<GlobalBatch> = s.batches_from(Cursor { epoch: 0, step_in_epoch: 13 }).take(3).collect();
    assert_eq!(late, run[13..16]);
}

#[test]
fn dataset_batches_and_errors() {
    let src = vec![vec![5, 6, 7], vec![8], vec![9, 10]];
    let tgt = vec![vec![11], vec![12, 13, 14, 15], vec![16]];
    let d = Dataset::from_ids(src.clone(), tgt.clone(), Path::new("mem")).unwrap();
    assert_eq!(d.lengths(64, 64), vec![7, 8, 6]);
    assert_eq!(d.lengths(3, 2), vec![5, 5, 5]);
    let b = d.batch(&[2, 0], SP, 64, 64).unwrap();
    assert_eq!(b, Batch::new(&[src[2].clone(), src[0].clone()], &[tgt[2].clone(), tgt[0].clone()], SP, 64, 64));
    assert!(d.batch(&[3], SP, 64, 64).is_err() && d.batch(&[0], SP, 1, 64).is_err());
    let e = d.sampler(4, 0, 64, 64).unwrap_err();
    assert!(e.is_bad_input() && e.to_string().contains("3 examples, fewer than training.global_batch (4)"), "{e}");
    assert!(Dataset::from_ids(src, vec![], Path::new("mem")).unwrap_err().is_bad_input());
    assert!(Dataset::from_ids(vec![], vec![], Path::new("mem")).is_err());
    assert!(Sampler::new(vec![1, 2], 0, 0).is_err());
    assert_eq!(Cursor { epoch: 2, step_in_epoch: 9 }.normalize(4), Cursor { epoch: 4, step_in_epoch: 1 });
}

#[test]
fn chunked_tokenization_matches_one_pass() {
    let (_d, tok) = crate::tokenizer::tests::tiny_tokenizer();
    let texts = ["the cat sat", "a dog", "hello world", "the mat , the cat", "unaffable dogs", "on a mat ."];
    let pairs: Vec<Pair> =
        (0..11).map(|i| Pair { source: texts[i % 6].into(), target: texts[(i * 5 + 1) % 6].into() }).collect();
    let (src, tgt) = tokenize_pairs(&tok, &pairs).unwrap();
    for chunk in [1, 4, 11, 100] {
        let d = Dataset::from_pairs_chunked(&tok, pairs.clone(), Path::new("mem"), chunk).unwrap();
        assert_eq!((d.src(), d.tgt()), (&src, &tgt), "chunk {chunk}");
    }
    let d = Dataset::from_pairs(&tok, pairs, Path::new("mem")).unwrap();
    assert_eq!((d.len(), d.origin()), (11, Path::new("mem")));
}
