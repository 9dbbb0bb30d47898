//! A tiny model and a batch with 37 label rows, for checking that the LM head's chunked
//! vocabulary projection (`Bert2Bert::set_lm_head_chunk_rows`) gives what one chunk gives, on
//! any backend: losses, every parameter gradient (which carry the head's input gradient into
//! the whole decoder and encoder), and the recomputed logits.

use std::path::Path;

use kernels::{Backend, IGNORE_INDEX, rng};

use super::{TinyBert, with_keys};
use crate::config::{BertConfig, ModelConfig};
use crate::net::{Bert2Bert, Inputs, PassOptions};
use crate::params::ParamTable;

/// (batch, source length, target length): 45 decoder rows, 8 of them padding, so 37 label rows.
const DIMS: (usize, usize, usize) = (5, 7, 9);

/// Weights, earlier gradients and one batch, as host data.
pub struct ChunkCase {
    pub table: ParamTable,
    cfg: ModelConfig,
    params: Vec<f32>,
    /// Gradients of earlier micro-batches: the pass must accumulate onto them.
    earlier: Vec<f32>,
    src: Vec<i32>,
    mask: Vec<f32>,
    dec: Vec<i32>,
    labels: Vec<i32>,
    seed: u64,
}

/// What one training pass gave.
pub struct ChunkRun {
    pub token_loss: Vec<f32>,
    pub grads: Vec<f32>,
    /// `last_logits` after the pass, `[label rows, vocab]`.
    pub logits: Vec<f32>,
}

impl ChunkCase {
    pub fn new(seed: u64) -> Self {
        // Odd sizes: a vocabulary of 53, hidden 12 (3 heads of 4).
        let sizes = TinyBert { vocab: 53, hidden: 12, layers: 1, heads: 3, intermediate: 17, positions: 16 };
        let json = with_keys(sizes.json(), serde_json::json!({"hidden_dropout_prob": 0.1}));
        let c = BertConfig::from_value(&json, Path::new("head-chunks")).expect("static config");
        let cfg = ModelConfig {
            encoder: c.clone(),
            decoder: c,
            tie_encoder_decoder: false,
            decoder_start_token_id: 2,
            pad_token_id: 0,
            eos_token_id: 3,
        };
        let table = ParamTable::new(&cfg);
        let n = table.storage_len;
        let params = (0..n as u64).map(|i| 0.3 * rng::normal(seed, i)).collect();
        let earlier = (0..n as u64).map(|i| 0.01 * rng::normal(seed ^ 1, i)).collect();
        let (bs, s, t) = DIMS;
        let word = |i: usize| 4 + (rng::mix(seed ^ 2, i as u64) % 49) as i32;
        // Examples 3 and 4 end in 1 and 2 padded source positions.
        let src: Vec<i32> = (0..bs * s).map(|i| if i % s + i / s >= s + 2 { 0 } else { word(i) }).collect();
        let mask = src.iter().map(|&x| if x == 0 { 0.0 } else { 1.0 }).collect();
        // Examples 2, 3 and 4 end in 1, 2 and 5 padded target positions: 8 of the 45 rows.
        let padded = |i: usize| i % t + [0, 0, 1, 2, 5][i / t] >= t;
        let labels: Vec<i32> = (0..bs * t).map(|i| if padded(i) { IGNORE_INDEX } else { word(1000 + i) }).collect();
        let dec = (0..bs * t).map(|i| if i % t == 0 { 2 } else { word(2000 + i) }).collect();
        Self { table, cfg, params, earlier, src, mask, dec, labels, seed }
    }

    /// Label rows of the batch (37).
    pub fn label_rows(&self) -> usize {
        self.labels.iter().filter(|&&y| y != IGNORE_INDEX).count()
    }

    /// One training pass (dropout on, label smoothing 0.1) on `b`, projecting `chunk_rows` label
    /// rows at a time, from the earlier gradients.
    pub fn run<B: Backend>(&self, b: &B, chunk_rows: Option<usize>) -> crate::Result<ChunkRun> {
        let mut net = Bert2Bert::new(b, self.cfg.clone(), self.table.clone(), &self.params)?;
        net.set_lm_head_chunk_rows(chunk_rows);
        net.grads = b.upload(&self.earlier)?;
        let (bs, s, t) = DIMS;
        let x = Inputs::new(b, bs, s, t, &self.src, &self.mask, &self.dec, &self.labels)?;
        let m = x.label_tokens();
        let opts =
            PassOptions { train: true, seed: self.seed ^ 3, label_smoothing: 0.1, grad_scale: Some(1.0 / m as f32) };
        let loss = net.pass(b, &x, opts)?;
        let grads = b.download(b.view(&net.grads, 0..self.table.storage_len))?;
        Ok(ChunkRun { token_loss: loss.token_loss, grads, logits: net.last_logits(b, m)? })
    }

    /// The first disagreement of `got` with `want` beyond `tol`, by name: token losses and logits
    /// relative to their largest value, each parameter's gradient relative to its tensor's largest
    /// (floored at 1e-3 of the largest gradient anywhere, for tensors whose true gradient is 0).
    pub fn compare(&self, want: &ChunkRun, got: &ChunkRun, tol: f32) -> Result<(), String> {
        close("token losses", &want.token_loss, &got.token_loss, tol, 0.0)?;
        close("logits", &want.logits, &got.logits, tol, 0.0)?;
        let floor = 1e-3 * max_abs(&want.grads);
        for e in self.table.owned() {
            let r = e.range();
            close(&format!("grad {}", e.name), &want.grads[r.clone()], &got.grads[r], tol, floor)?;
        }
        Ok(())
    }
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn close(what: &str, want: &[f32], got: &[f32], tol: f32, floor: f32) -> Result<(), String> {
    if want.len() != got.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let scale = max_abs(want).max(floor).max(f32::MIN_POSITIVE);
    // A NaN on either side is a disagreement.
    let off = |w: f32, g: f32| (w - g).abs().is_nan() || (w - g).abs() > tol * scale;
    match want.iter().zip(got).position(|(&w, &g)| off(w, g)) {
        Some(i) => Err(format!("{what}[{i}]: {} vs {} (scale {scale}, tolerance {tol})", got[i], want[i])),
        None => Ok(()),
    }
}
