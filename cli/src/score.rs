//! `bert2bert score`: per-example mean token cross-entropy in eval mode, and optionally the
//! gradient of the mean cross-entropy over ALL label tokens of the file (transformers'
//! EncoderDecoderModel loss), written by HF name.

use std::path::PathBuf;

use kernels::{Backend, Cpu};
use model::checkpoint::{self, Checkpoint, write_tensors};
use model::data::{Batch, read_pairs, tokenize_pairs};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::tokenizer::Tokenizer;

use crate::CliResult;
use crate::device::{self, GemmPrecision, LocalDevice};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory written by `bert2bert init` or a checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// JSONL ({"source", "target"}) or TSV file of pairs.
    #[arg(long)]
    data: PathBuf,
    /// Write d(mean loss)/d(parameter) for every parameter, by HF name.
    #[arg(long)]
    grads_out: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Default 128, or the model's max_position_embeddings if smaller.
    #[arg(long)]
    max_source_len: Option<usize>,
    /// Default 128, or the model's max_position_embeddings if smaller.
    #[arg(long)]
    max_target_len: Option<usize>,
    #[arg(long, default_value = "source")]
    source_field: String,
    #[arg(long, default_value = "target")]
    target_field: String,
    #[arg(long, default_value = "cpu")]
    device: LocalDevice,
}

pub fn run(a: Args) -> CliResult {
    crate::generate::check_batch_size(a.batch_size)?;
    let ck = checkpoint::load_model_dir(&a.model)?;
    let (enc_positions, dec_positions) = ck.config.max_lengths();
    let max_source_len = crate::generate::length_flag("--max-source-len", a.max_source_len, 3, enc_positions)?;
    let max_target_len = crate::generate::length_flag("--max-target-len", a.max_target_len, 2, dec_positions)?;
    let tok = Tokenizer::from_model_dir(&a.model)?;
    let pairs = read_pairs(&a.data, &a.source_field, &a.target_field)?;
    if pairs.is_empty() {
        return Err(model::Error::input(&a.data, "no pairs in file").into());
    }
    let (src, tgt) = tokenize_pairs(&tok, &pairs)?;
    let batches: Vec<Batch> = src
        .chunks(a.batch_size)
        .zip(tgt.chunks(a.batch_size))
        .map(|(s, t)| Batch::new(s, t, tok.framing(), max_source_len, max_target_len))
        .collect();
    match a.device {
        LocalDevice::Cpu => score_on(&Cpu, &a, &ck, &batches, pairs.len()),
        // Exact fp32 GEMMs: scores and gradients are compared against the CPU's.
        LocalDevice::Cuda(i) => score_on(&device::open_cuda(i, GemmPrecision::Fp32)?, &a, &ck, &batches, pairs.len()),
    }
}

fn score_on<B: Backend>(b: &B, a: &Args, ck: &Checkpoint, batches: &[Batch], examples: usize) -> CliResult {
    let total_tokens: usize = batches.iter().map(Batch::label_tokens).sum();
    let mut net = Bert2Bert::new(b, ck.config.clone(), ck.table.clone(), &ck.params)?;
    net.zero_grads(b)?;
    let grad_scale = a.grads_out.as_ref().map(|_| 1.0 / total_tokens as f32);
    let bar = crate::progress(examples as u64, "score");
    let (mut per_example, mut loss_sum) = (Vec::with_capacity(examples), 0.0f64);
    for batch in batches {
        let x = Inputs::from_batch(b, batch)?;
        let loss = net.pass(b, &x, PassOptions { train: false, seed: 0, label_smoothing: 0.0, grad_scale })?;
        loss_sum += loss.sum();
        per_example.extend(loss.per_example_mean());
        bar.inc(batch.batch as u64);
    }
    bar.finish_and_clear();
    let mean_loss = loss_sum / total_tokens as f64;
    if let Some(path) = &a.grads_out {
        let grads = b.download(b.view(&net.grads, 0..ck.table.storage_len))?;
        let tensors: Vec<(String, Vec<usize>, &[f32])> =
            ck.table.entries.iter().map(|e| (e.name.clone(), e.shape.clone(), &grads[e.range()])).collect();
        write_tensors(path, &tensors)?;
    }
    if a.json {
        let out =
            serde_json::json!({ "per_example_loss": per_example, "mean_loss": mean_loss, "tokens": total_tokens });
        println!("{out}");
    } else {
        for (i, l) in per_example.iter().enumerate() {
            println!("{i}\t{l:.6}");
        }
        println!("mean_loss\t{mean_loss:.6}\ttokens\t{total_tokens}");
    }
    Ok(())
}
