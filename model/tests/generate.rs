//! Generation with the KV cache must agree with the teacher-forced full forward: greedy tokens
//! are the argmax of the full forward's logits, and every returned hypothesis's score, recomputed
//! by the full forward, is the score beam search ranked it by (this catches cache reorder bugs).

use std::path::Path;

use kernels::{Cpu, IGNORE_INDEX, rng};
use model::net::{Bert2Bert, GenerateOptions, Inputs, LengthPenaltyKind, PassOptions};
use model::testing::TinyBert;
use model::{BertConfig, ModelConfig, ParamTable};

const VOCAB: usize = 29;
const EOS: i32 = 3;
const START: i32 = 2;

fn tiny(seed: u64, scale: f32) -> Bert2Bert<Cpu> {
    let v = TinyBert { vocab: VOCAB, hidden: 20, layers: 2, heads: 4, intermediate: 37, positions: 24 }.json();
    let c = BertConfig::from_value(&v, Path::new("tiny")).unwrap();
    let cfg = ModelConfig {
        encoder: c.clone(),
        decoder: c,
        tie_encoder_decoder: false,
        decoder_start_token_id: START,
        pad_token_id: 0,
        eos_token_id: EOS,
    };
    let table = ParamTable::new(&cfg);
    let params: Vec<f32> = (0..table.storage_len as u64).map(|i| scale * rng::normal(seed, i)).collect();
    Bert2Bert::new(&Cpu, cfg, table, &params).unwrap()
}

fn sources(seed: u64) -> Vec<Vec<i32>> {
    [5usize, 9, 3]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut s = vec![START];
            s.extend((0..len).map(|j| 4 + (rng::mix(seed ^ 99, (i * 100 + j) as u64) % (VOCAB as u64 - 4)) as i32));
            s.push(EOS);
            s
        })
        .collect()
}

/// Teacher-forced logits of `labels` given `src`.
fn full_logits(net: &mut Bert2Bert<Cpu>, src: &[i32], labels: &[i32]) -> Vec<Vec<f64>> {
    let mut dec = vec![START];
    dec.extend(&labels[..labels.len() - 1]);
    let x = Inputs::new(&Cpu, 1, src.len(), labels.len(), src, &vec![1.0; src.len()], &dec, labels).unwrap();
    net.pass(&Cpu, &x, PassOptions { train: false, seed: 0, label_smoothing: 0.0, grad_scale: None }).unwrap();
    let flat = net.last_logits(&Cpu, labels.len()).unwrap();
    flat.chunks(VOCAB).map(|r| r.iter().map(|&x| x as f64).collect()).collect()
}

fn log_prob(row: &[f64], tok: i32) -> f64 {
    let m = row.iter().copied().fold(f64::MIN, f64::max);
    row[tok as usize] - (m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln())
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("generate test seed {s}");
    s
}

#[test]
fn greedy_matches_argmax_of_full_forward() {
    let s = seed();
    let mut net = tiny(s, 0.5);
    let srcs = sources(s);
    let opts = GenerateOptions { beams: 1, max_len: 10, min_len: 2, ..Default::default() };
    let out = net.generate(&Cpu, &srcs, &opts).unwrap();
    for (src, g) in srcs.iter().zip(&out) {
        let mut labels = g.tokens.clone();
        if g.ended {
            labels.push(EOS);
        }
        assert!(!labels.is_empty() && labels.len() <= opts.max_len);
        let logits = full_logits(&mut net, src, &labels);
        for (t, (row, &tok)) in logits.iter().zip(&labels).enumerate() {
            let mut best = (0..VOCAB).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i32;
            if t < opts.min_len && best == EOS {
                // min_len bans [SEP]: the runner-up is what greedy must pick.
                best =
                    (0..VOCAB).filter(|&v| v as i32 != EOS).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i32;
            }
            assert_eq!(tok, best, "step {t}: greedy picked {tok}, full forward's argmax is {best}");
        }
    }
}

#[test]
fn every_beam_hypothesis_score_matches_full_forward() {
    let s = seed();
    // Flat-ish distributions, so beams overtake each other and the cache must follow them.
    let mut net = tiny(s ^ 1, 0.35);
    let srcs = sources(s);
    for kind in [LengthPenaltyKind::Gnmt, LengthPenaltyKind::Hf] {
        let opts = GenerateOptions {
            beams: 5,
            max_len: 9,
            min_len: 3,
            length_penalty: 0.8,
            penalty_kind: kind,
            no_repeat_ngram: 2,
        };
        let nbest = net.generate_nbest(&Cpu, &srcs, &opts).unwrap();
        let mut checked = 0;
        for (src, hyps) in srcs.iter().zip(&nbest) {
            assert!(!hyps.is_empty());
            assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score), "n-best is sorted");
            for h in hyps {
                let mut labels = h.tokens.clone();
                if h.ended {
                    labels.push(EOS);
                }
                let logits = full_logits(&mut net, src, &labels);
                let sum: f64 = logits.iter().zip(&labels).map(|(row, &t)| log_prob(row, t)).sum();
                let len = labels.len() as f64;
                let lp = match kind {
                    LengthPenaltyKind::Gnmt => ((5.0 + len) / 6.0).powf(0.8),
                    LengthPenaltyKind::Hf => len.powf(0.8),
                };
                assert!(
                    (sum / lp - h.score).abs() < 1e-4 * h.score.abs().max(1.0),
                    "{kind:?} {:?}: recomputed {} vs reported {}",
                    h.tokens,
                    sum / lp,
                    h.score
                );
                checked += 1;
            }
        }
        eprintln!("{kind:?}: {checked} hypotheses checked");
        assert!(checked > srcs.len(), "beam search should finish several hypotheses per source");
    }
}

#[test]
fn no_repeat_ngram_holds() {
    let s = seed();
    let mut net = tiny(s ^ 2, 0.3);
    let opts = GenerateOptions { beams: 3, max_len: 16, min_len: 16, no_repeat_ngram: 2, ..Default::default() };
    for g in net.generate(&Cpu, &sources(s), &opts).unwrap() {
        let mut seen = std::collections::HashSet::new();
        for w in g.tokens.windows(2) {
            assert!(seen.insert((w[0], w[1])), "bigram {w:?} repeats in {:?}", g.tokens);
        }
        assert!(g.tokens.iter().all(|&t| t != IGNORE_INDEX && (t as usize) < VOCAB));
    }
}
