//! `bert2bert bench`: median time of a full training step (forward + backward + AdamW) on a
//! synthetic full-length batch, the same work as bench/pytorch_cpu.py does in transformers.

mod predict;

use std::path::{Path, PathBuf};
use std::time::Instant;

use kernels::{Cpu, rng};
use model::checkpoint::{self, Checkpoint};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};
use model::{BertConfig, ModelConfig, ParamTable};
use rayon::prelude::*;

use crate::device::{self, DeviceInfo, GemmPrecision, LocalDevice};
use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// A model directory; its weights don't change the timing, only its shape does.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A built-in shape with random weights: minilm (6+6 layers, hidden 384) or bert-base.
    #[arg(long)]
    config: Option<String>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    src_len: usize,
    #[arg(long, default_value_t = 64)]
    tgt_len: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value = "cpu")]
    device: LocalDevice,
    #[arg(long)]
    json: bool,
    /// Predict the step on a GPU (h100 or h200) instead of timing it: count each launch's
    /// declared bytes and FLOPs (kernel bodies skipped on cuda-emu) and price them on a roofline.
    #[arg(long, value_name = "GPU")]
    predict: Option<String>,
    /// GEMM precision on cuda devices: bf16 (tensor cores, fp32 accumulation) or fp32.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "fp32"])]
    precision: String,
}

pub fn builtin(name: &str) -> CliResult<ModelConfig> {
    let (hidden, layers, heads, inter) = match name {
        "minilm" => (384, 6, 12, 1536),
        "bert-base" => (768, 12, 12, 3072),
        _ => {
            return Err(CliError::usage(format!("--config `{name}`: use minilm or bert-base")));
        }
    };
    let v = serde_json::json!({
        "vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": inter, "max_position_embeddings": 512, "type_vocab_size": 2
    });
    let c = BertConfig::from_value(&v, Path::new(name))?;
    Ok(ModelConfig {
        encoder: c.clone(),
        decoder: c,
        tie_encoder_decoder: false,
        decoder_start_token_id: 101,
        pad_token_id: 0,
        eos_token_id: 102,
    })
}

/// BERT-style random weights: N(0, 0.02) matrices, zero biases, unit LayerNorm scales.
fn random_checkpoint(config: ModelConfig) -> Checkpoint {
    let table = ParamTable::new(&config);
    let mut params = vec![0.0f32; table.storage_len];
    for e in table.owned() {
        let r = e.range();
        if e.name.ends_with("LayerNorm.weight") {
            params[r].fill(1.0);
        } else if !e.no_decay {
            params[r].par_iter_mut().enumerate().for_each(|(i, p)| *p = 0.02 * rng::normal(e.offset as u64, i as u64));
        }
    }
    Checkpoint { config, table, params }
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        0.5 * (s[s.len() / 2 - 1] + s[s.len() / 2])
    }
}

/// Model FLOPs of one training step (forward + backward), counted analytically; the MFU
/// numerator, and bench/pytorch_gpu.py uses the same formula.
///
/// - Every Linear (`rows x in -> out`) costs `6 * rows * in * out`: 2 forward, 2 for the input
///   gradient and 2 for the weight gradient. Encoder layer: Q, K, V, O (`C x C`) and the FFN
///   (`C x I`, `I x C`) over `B*S` rows. Decoder layer: self-attention Q, K, V, O and
///   cross-attention Q, O over `B*T` rows, cross-attention K, V over the `B*S` encoder rows,
///   the FFN over `B*T` rows. LM head: transform (`C x C`) and the tied vocabulary projection
///   (`C x V`) over the `M` label rows (we run the head on label rows only; the benchmark batch
///   has no padding, so `M = B*T`, the same as transformers).
/// - Every attention costs `12 * B * Tq * Tk * C`: `Q K^T` and `P V` are `2*B*H*Tq*Tk*D` each
///   forward (`H*D = C`), and backward does twice the forward's work (`dP`, `dV`, `dQ`, `dK`).
///   Causal self-attention is counted in full (no halving), the usual convention (PaLM's).
/// - Not counted: embeddings, LayerNorm, GELU, softmax, dropout, loss, AdamW (all O(params) or
///   O(tokens * C), under 1% here).
pub fn step_flops(c: &ModelConfig, batch: usize, src: usize, tgt: usize, label_rows: usize) -> f64 {
    let (e, d) = (&c.encoder, &c.decoder);
    let (b, s, t, m) = (batch as f64, src as f64, tgt as f64, label_rows as f64);
    let (ce, ie, le) = (e.hidden_size as f64, e.intermediate_size as f64, e.num_hidden_layers as f64);
    let (cd, id, ld, v) =
        (d.hidden_size as f64, d.intermediate_size as f64, d.num_hidden_layers as f64, d.vocab_size as f64);
    let linear = b * s * le * (4.0 * ce * ce + 2.0 * ce * ie)
        + ld * (b * t * (6.0 * cd * cd + 2.0 * cd * id) + b * s * 2.0 * ce * cd)
        + m * (cd * cd + cd * v);
    let attention = b * (le * s * s * ce + ld * (t * t + t * s) * cd);
    6.0 * linear + 12.0 * attention
}

/// A synthetic full-length batch: `[CLS] words [SEP]` sources, random-word targets ending in
/// `[SEP]`, decoder inputs = targets shifted right after `[CLS]` (as bench/pytorch_*.py).
struct SynthBatch {
    src: Vec<i32>,
    mask: Vec<f32>,
    dec: Vec<i32>,
    labels: Vec<i32>,
}

fn synthetic_batch(c: &ModelConfig, bs: usize, s: usize, t: usize) -> SynthBatch {
    let vocab = c.decoder.vocab_size as u64;
    // Ordinary word ids: above BERT's special and unused tokens when the vocabulary is big.
    let lo = if vocab > 2000 { 1000 } else { vocab / 4 };
    let word = |i: u64| (lo + rng::mix(12345, i) % (vocab - lo)) as i32;
    let (cls, sep) = (c.decoder_start_token_id, c.eos_token_id);
    let src: Vec<i32> = (0..bs * s)
        .map(|i| {
            if i % s == 0 {
                cls
            } else if i % s == s - 1 {
                sep
            } else {
                word(i as u64)
            }
        })
        .collect();
    let labels: Vec<i32> = (0..bs * t).map(|i| if i % t == t - 1 { sep } else { word(1_000_000 + i as u64) }).collect();
    let dec: Vec<i32> = (0..bs * t).map(|i| if i % t == 0 { cls } else { labels[i - 1] }).collect();
    SynthBatch { src, mask: vec![1.0f32; bs * s], dec, labels }
}

/// The most `--steps` and `--warmup` steps: a benchmark, not a training run.
const MAX_STEPS: usize = 10_000;
/// The largest `--batch`.
const MAX_BATCH: usize = 4096;

/// Flags that need no model; errors name the flag.
fn check_flags(a: &Args) -> CliResult {
    for (flag, v, least, most) in
        [("--batch", a.batch, 1, MAX_BATCH), ("--steps", a.steps, 1, MAX_STEPS), ("--warmup", a.warmup, 0, MAX_STEPS)]
    {
        if !(least..=most).contains(&v) {
            return Err(CliError::usage(format!("{flag} must be in {least}..={most}, got {v}")));
        }
    }
    Ok(())
}

/// The lengths against the model's position tables, and on the CPU the step's memory against
/// what the machine has: an allocation that fails aborts the process, so refuse it first.
fn check_shape(a: &Args, cfg: &ModelConfig, params: usize) -> CliResult {
    let (enc, dec) = cfg.max_lengths();
    for (flag, v, most) in [("--src-len", a.src_len, enc), ("--tgt-len", a.tgt_len, dec)] {
        if !(2..=most).contains(&v) {
            return Err(CliError::usage(format!(
                "{flag} must be in 2..={most} (the model's max_position_embeddings), got {v}"
            )));
        }
    }
    let need = step_bytes(cfg, params, a.batch, a.src_len, a.tgt_len);
    if a.device == LocalDevice::Cpu
        && let Some(have) = available_bytes()
        && need > have as f64
    {
        return Err(CliError::usage(format!(
            "--batch {} --src-len {} --tgt-len {} needs about {:.1} GB, more than the {:.1} GB available",
            a.batch,
            a.src_len,
            a.tgt_len,
            need / 1e9,
            have as f64 / 1e9
        )));
    }
    Ok(())
}

/// A rough upper estimate of a training step's memory in bytes: parameters, gradients and the
/// two AdamW moments, plus the activations backward keeps (per token a few dozen hidden-size
/// vectors and the FFN, attention probabilities per head, the LM head's logits).
fn step_bytes(c: &ModelConfig, params: usize, batch: usize, s: usize, t: usize) -> f64 {
    let (e, d) = (&c.encoder, &c.decoder);
    let (b, s, t) = (batch as f64, s as f64, t as f64);
    let enc = e.num_hidden_layers as f64
        * (b * s * (10.0 * e.hidden_size as f64 + 3.0 * e.intermediate_size as f64)
            + 3.0 * b * e.num_attention_heads as f64 * s * s);
    let dec = d.num_hidden_layers as f64
        * (b * t * (16.0 * d.hidden_size as f64 + 3.0 * d.intermediate_size as f64)
            + 3.0 * b * d.num_attention_heads as f64 * (t * t + t * s));
    let head = 2.0 * b * t * d.vocab_size as f64;
    4.0 * (4.0 * params as f64 + enc + dec + head)
}

/// MemAvailable of /proc/meminfo, where there is one.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: Args) -> CliResult {
    check_flags(&a)?;
    let predict_on = a.predict.as_deref().map(|name| predict::target(&a, name)).transpose()?;
    let ck = match (&a.model, &a.config) {
        (Some(dir), _) => checkpoint::load_model_dir(dir)?,
        (None, Some(name)) => {
            let config = builtin(name)?;
            check_shape(&a, &config, ParamTable::new(&config).storage_len)?;
            if predict_on.is_some() { predict::zero_checkpoint(config) } else { random_checkpoint(config) }
        }
        (None, None) => {
            return Err(CliError::usage("give --model DIR or --config minilm|bert-base"));
        }
    };
    check_shape(&a, &ck.config, ck.table.storage_len)?;
    // bf16 tensor-core GEMMs with fp32 accumulation by default, fp32 everything else.
    let precision = if a.precision == "fp32" { GemmPrecision::Fp32 } else { GemmPrecision::Bf16 };
    match (a.device, predict_on) {
        (LocalDevice::Cuda(i), Some(gpu)) => predict::run(&device::open_cuda(i, precision)?, &a, &ck, gpu),
        (LocalDevice::Cpu, _) => bench_on(&Cpu, &a, &ck),
        (LocalDevice::Cuda(i), None) => bench_on(&device::open_cuda(i, precision)?, &a, &ck),
    }
}

fn bench_on<B: DeviceInfo>(b: &B, a: &Args, ck: &Checkpoint) -> CliResult {
    let (bs, s, t) = (a.batch, a.src_len, a.tgt_len);
    // Full-length rows of random word ids (no padding): the worst case for us, since the LM
    // head then runs on every row.
    let batch = synthetic_batch(&ck.config, bs, s, t);
    let mut net = Bert2Bert::new(b, ck.config.clone(), ck.table.clone(), &ck.params)?;
    let mut opt = Optimizer::new(b, &ck.table, AdamWConfig::default())?;
    let x = Inputs::new(b, bs, s, t, &batch.src, &batch.mask, &batch.dec, &batch.labels)?;
    let scale = 1.0 / x.label_tokens() as f32;
    let flops = step_flops(&ck.config, bs, s, t, x.label_tokens());
    let bar = crate::progress((a.warmup + a.steps) as u64, "bench");
    let (mut times, mut phase_sum): (Vec<f64>, Vec<(&'static str, f64)>) = (Vec::new(), Vec::new());
    let mut last_loss = 0.0;
    let mut peak_device = b.used_bytes();
    b.synchronize()?;
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        net.zero_grads(b)?;
        let loss = net.pass(
            b,
            &x,
            PassOptions { train: true, seed: step as u64, label_smoothing: 0.0, grad_scale: Some(scale) },
        )?;
        peak_device = peak_device.max(b.used_bytes());
        let t_opt = Instant::now();
        net.update(b, &mut opt, 5e-5, 1.0)?;
        // Asynchronous backends: the step ends when the device has finished it.
        b.synchronize()?;
        let now = Instant::now();
        peak_device = peak_device.max(b.used_bytes());
        last_loss = loss.sum() / loss.tokens() as f64;
        if step >= a.warmup {
            times.push((now - t0).as_secs_f64() * 1e3);
            let mut phases = net.phases.clone();
            phases.push(("optimizer", (now - t_opt).as_secs_f64() * 1e3));
            if phase_sum.is_empty() {
                phase_sum = phases.iter().map(|&(n, _)| (n, 0.0)).collect();
            }
            for (acc, (_, ms)) in phase_sum.iter_mut().zip(&phases) {
                acc.1 += ms / a.steps as f64;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let step_ms = median(&times);
    let tokens_per_s = (bs * (s + t)) as f64 / (step_ms / 1e3);
    let device = b.name();
    let achieved = flops / (step_ms / 1e3);
    let mfu = b.peak_flops().map(|peak| achieved / peak);
    if a.json {
        let phases: serde_json::Map<String, serde_json::Value> =
            phase_sum.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect();
        let out = serde_json::json!({
            "impl": "bert2bert", "device": device, "threads": rayon::current_num_threads(),
            "batch": bs, "src_len": s, "tgt_len": t, "steps": a.steps, "warmup": a.warmup,
            "step_ms_median": step_ms, "step_ms_all": times, "tokens_per_s": tokens_per_s,
            "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device,
            "flops_per_step": flops, "achieved_flops": achieved,
            "peak_flops": b.peak_flops(), "mfu": mfu,
            "phases_ms_mean": phases, "last_loss": last_loss,
        });
        println!("{out}");
    } else {
        println!("device {device}: batch {bs} src {s} tgt {t}");
        println!(
            "step {step_ms:.1} ms (median of {}), {tokens_per_s:.0} tokens/s, peak RSS {:.2} GB",
            a.steps,
            peak_rss_bytes().unwrap_or(0) as f64 / 1e9
        );
        let mfu_txt = mfu.map(|m| format!(", MFU {:.1}%", 100.0 * m)).unwrap_or_default();
        println!("model FLOPs {:.3e}/step, {:.1} GFLOP/s{mfu_txt}", flops, achieved / 1e9);
        if let Some(p) = peak_device {
            println!("peak device memory in use {:.2} GB", p as f64 / 1e9);
        }
        for (n, ms) in &phase_sum {
            println!("  {n:<18} {ms:8.1} ms");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_is_about_six_n_per_token_for_bert_base() {
        // Dense parameters touched per token, counted by hand for bert-base bert2bert:
        // encoder layer 4C^2 + 2CI; decoder layer 8C^2 + 2CI (self Q K V O, cross Q O, and
        // cross K V, which run on source rows, as many as target rows here); LM head C^2 + CV.
        let c = builtin("bert-base").ok().unwrap();
        let (b, s, t) = (32usize, 128usize, 128usize);
        let f = step_flops(&c, b, s, t, b * t);
        let (cc, i, v) = (768.0f64, 3072.0f64, 30522.0f64);
        let per_token_enc = 12.0 * (4.0 * cc * cc + 2.0 * cc * i);
        let per_token_dec = 12.0 * (8.0 * cc * cc + 2.0 * cc * i) + cc * cc + cc * v;
        let linear = 6.0 * (b * s) as f64 * per_token_enc + 6.0 * (b * t) as f64 * per_token_dec;
        let attention = 12.0 * b as f64 * 12.0 * (3.0 * 128.0 * 128.0) * cc;
        assert!((f - linear - attention).abs() < 1e-6 * f, "{f} vs {}", linear + attention);
        // About 5.6 TFLOP per step at this shape, 3% of it in attention.
        assert!(f > 5.5e12 && f < 5.8e12, "{f:e}");
    }
}
