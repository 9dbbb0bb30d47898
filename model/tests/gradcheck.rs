//! Finite-difference check of the hand-written backward: every parameter tensor of a tiny
//! BERT2BERT (and of its bertShare variant), with dropout and label smoothing on, since the
//! counter-based dropout mask is a fixed function of the seed.

use std::path::Path;

use kernels::{Cpu, IGNORE_INDEX, Memory, rng};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::testing::{TinyBert, with_keys};
use model::{BertConfig, ModelConfig, ParamTable};

fn tiny_config(tie: bool) -> ModelConfig {
    let sizes = TinyBert { vocab: 23, hidden: 12, layers: 2, heads: 3, intermediate: 17, positions: 16 };
    let v = with_keys(
        sizes.json(),
        serde_json::json!({"layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.15}),
    );
    let c = BertConfig::from_value(&v, Path::new("tiny")).unwrap();
    ModelConfig {
        encoder: c.clone(),
        decoder: c,
        tie_encoder_decoder: tie,
        decoder_start_token_id: 2,
        pad_token_id: 0,
        eos_token_id: 3,
    }
}

fn fresh_seed() -> u64 {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("gradcheck seed {s}");
    s
}

fn check_variant(tie: bool) {
    let seed = fresh_seed();
    let cfg = tiny_config(tie);
    let table = ParamTable::new(&cfg);
    let params: Vec<f32> = (0..table.storage_len as u64).map(|i| 0.4 * rng::normal(seed, i)).collect();
    let b = Cpu;
    let mut net = Bert2Bert::new(&b, cfg, table.clone(), &params).unwrap();
    // Two examples: the second has source padding and a shorter target.
    let (bs, s, t) = (2, 6, 5);
    let id = |i: u64| 4 + (rng::mix(seed ^ 77, i) % 19) as i32;
    let src: Vec<i32> = (0..12).map(|i| if i >= 10 { 0 } else { id(i) }).collect();
    let mask: Vec<f32> = src.iter().map(|&x| if x == 0 { 0.0 } else { 1.0 }).collect();
    let dec: Vec<i32> = (0..10)
        .map(|i| {
            if i == 0 || i == 5 {
                2
            } else if i >= 8 {
                0
            } else {
                id(100 + i)
            }
        })
        .collect();
    let labels: Vec<i32> = (0..10).map(|i| if i >= 8 { IGNORE_INDEX } else { id(200 + i) }).collect();
    let x = Inputs::new(&b, bs, s, t, &src, &mask, &dec, &labels).unwrap();
    let tokens = x.label_tokens() as f64;
    let opts = PassOptions { train: true, seed: seed ^ 5, label_smoothing: 0.1, grad_scale: Some(1.0 / tokens as f32) };
    net.zero_grads(&b).unwrap();
    net.pass(&b, &x, opts).unwrap();
    let grads = b.download(b.view(&net.grads, 0..table.storage_len)).unwrap();
    let fwd = PassOptions { grad_scale: None, ..opts };
    let loss_at = |net: &mut Bert2Bert<Cpu>, p: &[f32]| -> f64 {
        net.params.copy_from_slice(p);
        net.pass(&b, &x, fwd).unwrap().sum() / tokens
    };
    let eps = 1e-2f32;
    let mut worst = (0.0f32, String::new());
    for e in table.owned() {
        let n = e.numel();
        let picks: Vec<usize> = if n <= 24 {
            (0..n).collect()
        } else {
            (0..24).map(|k| (rng::mix(seed ^ 9, k + e.offset as u64) % n as u64) as usize).collect()
        };
        let mut p = params.clone();
        let (mut max_diff, mut max_ref) = (0.0f32, 0.0f32);
        for &i in &picks {
            let j = e.offset + i;
            p[j] = params[j] + eps;
            let up = loss_at(&mut net, &p);
            p[j] = params[j] - eps;
            let down = loss_at(&mut net, &p);
            p[j] = params[j];
            let num = ((up - down) / (2.0 * eps as f64)) as f32;
            max_diff = max_diff.max((num - grads[j]).abs());
            max_ref = max_ref.max(num.abs());
        }
        if e.frozen {
            assert!(picks.iter().all(|&i| grads[e.offset + i] == 0.0), "{} must get no gradient", e.name);
            continue;
        }
        // Key biases have a zero true gradient: compare on an absolute floor.
        let rel = max_diff / max_ref.max(5e-3);
        if rel > worst.0 {
            worst = (rel, e.name.clone());
        }
        assert!(
            rel < 3e-2,
            "{}: finite-difference mismatch {rel:e} (max diff {max_diff:e}, max grad {max_ref:e})",
            e.name
        );
    }
    eprintln!("tie={tie}: worst relative error {:e} in {}", worst.0, worst.1);
}

#[test]
fn every_tensor_matches_finite_differences_bert2bert() {
    check_variant(false);
}

#[test]
fn every_tensor_matches_finite_differences_bertshare() {
    check_variant(true);
}
