//! Golden test against PyTorch/transformers: fixtures written by scripts/golden/gen_golden.py
//! (a tiny random BERT2BERT saved by `save_pretrained`, a batch, and the f64 reference losses and
//! gradients). This also proves that our loader reads what transformers writes.

use std::path::{Path, PathBuf};

use kernels::{Cpu, Memory};
use model::checkpoint::{load_model_dir, read_i32_tensor, read_tensors};
use model::net::{Bert2Bert, Inputs, PassOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn scalar_vec(golden: &[(String, Vec<usize>, Vec<f32>)], name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = golden.iter().find(|t| t.0 == name).unwrap_or_else(|| panic!("golden lacks {name}"));
    (t.1.clone(), t.2.clone())
}

fn check(name: &str) {
    let dir = fixture(name);
    let ck = load_model_dir(&dir).unwrap();
    let gpath = dir.join("golden.safetensors");
    let golden = read_tensors(&gpath).unwrap();
    let (src_shape, src) = read_i32_tensor(&gpath, "src_ids").unwrap();
    let (dec_shape, dec) = read_i32_tensor(&gpath, "dec_ids").unwrap();
    let (_, labels) = read_i32_tensor(&gpath, "labels").unwrap();
    let (_, mask) = scalar_vec(&golden, "src_mask");
    let (bs, s, t) = (src_shape[0], src_shape[1], dec_shape[1]);
    let b = Cpu;
    let mut net = Bert2Bert::new(&b, ck.config.clone(), ck.table.clone(), &ck.params).unwrap();
    let x = Inputs::new(&b, bs, s, t, &src, &mask, &dec, &labels).unwrap();
    let tokens = x.label_tokens();
    net.zero_grads(&b).unwrap();
    let loss = net
        .pass(
            &b,
            &x,
            PassOptions { train: false, seed: 0, label_smoothing: 0.0, grad_scale: Some(1.0 / tokens as f32) },
        )
        .unwrap();

    let (_, want_per_example) = scalar_vec(&golden, "per_example_loss");
    for (i, (got, want)) in loss.per_example_mean().iter().zip(&want_per_example).enumerate() {
        let rel = (got - *want as f64).abs() / (*want as f64).abs();
        assert!(rel < 1e-5, "{name}: example {i} loss {got} vs {want} (rel {rel:e})");
    }
    let (_, want_mean) = scalar_vec(&golden, "mean_loss");
    let got_mean = loss.sum() / tokens as f64;
    assert!(
        (got_mean - want_mean[0] as f64).abs() < 1e-5 * want_mean[0] as f64,
        "{name}: mean loss {got_mean} vs {}",
        want_mean[0]
    );

    let smoothed =
        net.pass(&b, &x, PassOptions { train: false, seed: 0, label_smoothing: 0.1, grad_scale: None }).unwrap();
    let (_, want_ls) = scalar_vec(&golden, "mean_loss_ls01");
    let got_ls = smoothed.sum() / tokens as f64;
    assert!(
        (got_ls - want_ls[0] as f64).abs() < 1e-5 * want_ls[0] as f64,
        "{name}: smoothed loss {got_ls} vs {}",
        want_ls[0]
    );

    let grads = b.download(b.view(&net.grads, 0..ck.table.storage_len)).unwrap();
    let mut compared = 0;
    for e in &ck.table.entries {
        let Some((shape, want)) =
            golden.iter().find(|g| g.0 == format!("grad.{}", e.name)).map(|g| (g.1.clone(), g.2.clone()))
        else {
            continue;
        };
        assert_eq!(shape, e.shape, "{name}: {} shape", e.name);
        let got = &grads[e.range()];
        let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if e.name.contains(".self.key.bias") {
            // Softmax is shift-invariant: the true gradient is zero, compare absolutely.
            assert!(max_diff < 1e-6, "{name}: {} differs by {max_diff:e}", e.name);
        } else {
            assert!(max_diff <= 1e-4 * max_ref.max(1e-6), "{name}: {} rel err {:e}", e.name, max_diff / max_ref);
        }
        compared += 1;
    }
    assert!(compared >= ck.table.entries.len() - 2, "{name}: only {compared} gradients compared");
}

#[test]
fn matches_transformers_bert2bert() {
    check("tiny_bert2bert");
}

#[test]
fn matches_transformers_bertshare() {
    check("tiny_bertshare");
}

#[test]
fn matches_transformers_roberta2roberta() {
    check("tiny_roberta2roberta");
}

#[test]
fn matches_transformers_robertashare() {
    check("tiny_robertashare");
}

/// A BERT encoder and a RoBERTa decoder: two families, two vocabularies (97 and 89 tokens).
#[test]
fn matches_transformers_bert2roberta() {
    check("tiny_bert2roberta");
}
