//! `bert2bert bench`: median time of a full training step (forward + backward + AdamW) on a
//! synthetic full-length batch, the same work as bench/pytorch_cpu.py does in transformers.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kernels::{Cpu, rng};
use model::checkpoint::{self, Checkpoint};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};
use model::{BertConfig, ModelConfig, ParamTable};

use crate::device::Device;
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
    device: Device,
    #[arg(long)]
    json: bool,
}

fn builtin(name: &str) -> CliResult<ModelConfig> {
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
            for (i, p) in params[r.clone()].iter_mut().enumerate() {
                *p = 0.02 * rng::normal(e.offset as u64, i as u64);
            }
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

pub fn run(a: Args) -> CliResult {
    a.device.require_cpu()?;
    if a.batch == 0 || a.src_len < 2 || a.tgt_len < 2 || a.steps == 0 {
        return Err(CliError::usage("--batch and --steps must be > 0, lengths >= 2"));
    }
    let ck = match (&a.model, &a.config) {
        (Some(dir), _) => checkpoint::load_model_dir(dir)?,
        (None, Some(name)) => random_checkpoint(builtin(name)?),
        (None, None) => {
            return Err(CliError::usage("give --model DIR or --config minilm|bert-base"));
        }
    };
    let vocab = ck.config.decoder.vocab_size as u64;
    let (bs, s, t) = (a.batch, a.src_len, a.tgt_len);
    // Full-length rows of random word ids (no padding): the worst case for us, since the LM
    // head then runs on every row.
    // Ordinary word ids: above BERT's special and unused tokens when the vocabulary is big.
    let lo = if vocab > 2000 { 1000 } else { vocab / 4 };
    let word = |i: u64| (lo + rng::mix(12345, i) % (vocab - lo)) as i32;
    let (cls, sep) = (ck.config.decoder_start_token_id, ck.config.eos_token_id);
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
    let mask = vec![1.0f32; bs * s];

    let b = Cpu;
    let mut net = Bert2Bert::new(&b, ck.config.clone(), ck.table.clone(), &ck.params)?;
    let mut opt = Optimizer::new(&b, &ck.table, AdamWConfig::default())?;
    let x = Inputs::new(&b, bs, s, t, &src, &mask, &dec, &labels)?;
    let scale = 1.0 / x.label_tokens() as f32;
    let bar = crate::progress((a.warmup + a.steps) as u64, "bench");
    let (mut times, mut phase_sum): (Vec<f64>, Vec<(&'static str, f64)>) = (Vec::new(), Vec::new());
    let mut last_loss = 0.0;
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        net.zero_grads(&b)?;
        let loss = net.pass(
            &b,
            &x,
            PassOptions { train: true, seed: step as u64, label_smoothing: 0.0, grad_scale: Some(scale) },
        )?;
        let t_opt = Instant::now();
        opt.update(&b, &ck.table, &mut net.params, &net.grads, 5e-5)?;
        let now = Instant::now();
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
    let device = format!("cpu ({} threads)", rayon::current_num_threads());
    if a.json {
        let phases: serde_json::Map<String, serde_json::Value> =
            phase_sum.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect();
        let out = serde_json::json!({
            "impl": "bert2bert", "device": device, "threads": rayon::current_num_threads(),
            "batch": bs, "src_len": s, "tgt_len": t,
            "step_ms_median": step_ms, "step_ms_all": times, "tokens_per_s": tokens_per_s,
            "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": null, "mfu": null,
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
        for (n, ms) in &phase_sum {
            println!("  {n:<18} {ms:8.1} ms");
        }
    }
    Ok(())
}
