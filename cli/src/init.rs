//! `bert2bert init`: warm start an HF EncoderDecoderModel directory.

use std::path::PathBuf;

use model::{Variant, checkpoint, init, tokenizer::Tokenizer};

use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// HF BERT directory (config.json, model.safetensors, tokenizer.json) for the encoder.
    #[arg(long)]
    encoder: PathBuf,
    /// HF BERT directory for the decoder, or `random`.
    #[arg(long)]
    decoder: String,
    /// bert2bert | bertshare | bert2rnd | rnd2bert | rnd2rnd
    #[arg(long, default_value = "bert2bert")]
    variant: String,
    /// Output directory: new, empty, or a model directory (config.json + model.safetensors) whose
    /// model files are replaced. Each file is written atomically; other files are left alone.
    #[arg(long)]
    out: PathBuf,
    /// Write the model files into `--out` even when it is a directory of other things (they are
    /// left in place; nothing is deleted). A plain file is never replaced.
    #[arg(long)]
    force: bool,
    /// Seed of the randomly initialised weights (cross-attention and random stacks).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> CliResult {
    let variant = Variant::parse(&a.variant).ok_or_else(|| {
        CliError::usage(format!("--variant `{}`: use bert2bert, bertshare, bert2rnd, rnd2bert or rnd2rnd", a.variant))
    })?;
    let decoder_dir = if a.decoder == "random" {
        if variant.decoder_from_bert() {
            return Err(CliError::usage(format!(
                "--decoder random contradicts --variant {}: use bert2rnd or rnd2rnd, or give a BERT directory",
                variant.as_str()
            )));
        }
        None
    } else {
        Some(PathBuf::from(&a.decoder))
    };
    let tok = Tokenizer::from_file(&a.encoder.join("tokenizer.json"))?;
    let ck = init::warm_start(&a.encoder, decoder_dir.as_deref(), variant, tok.special(), a.seed)?;
    checkpoint::save_model_dir_opts(&a.out, &ck, Some(&tok), a.force)?;
    tracing::info!(
        "wrote {} ({}, {} tensors, {:.1}M parameters)",
        a.out.display(),
        variant.as_str(),
        ck.table.entries.len(),
        ck.table.storage_len as f64 / 1e6
    );
    Ok(())
}
