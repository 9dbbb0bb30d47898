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
    let (ck, report) =
        init::warm_start_with_report(&a.encoder, decoder_dir.as_deref(), variant, tok.special(), a.seed)?;
    model::guards::check_tokenizer_fits(&ck.config, tok.vocab_size(), &a.encoder.join("tokenizer.json"))?;
    checkpoint::save_model_dir_opts(&a.out, &ck, Some(&tok), a.force)?;
    print_report(&report);
    tracing::info!(
        "wrote {} ({}, {} tensors, {:.1}M parameters)",
        a.out.display(),
        variant.as_str(),
        ck.table.entries.len(),
        ck.table.storage_len as f64 / 1e6
    );
    Ok(())
}

/// What came from the checkpoints, what was initialised at random and what was ignored, as
/// counts with the names, layers folded (`layer.*.` with how many).
fn print_report(r: &init::InitReport) {
    println!("from the checkpoints: {} tensors", r.from_checkpoint.len());
    for (what, names) in
        [("initialised at random", &r.random), ("ignored (in a checkpoint, not in the model)", &r.ignored)]
    {
        println!("{what}: {} tensors", names.len());
        for (pattern, n) in fold_layers(names) {
            let times = if n > 1 { format!(" (x{n})") } else { String::new() };
            println!("  {pattern}{times}");
        }
    }
}

/// Names with every `layer.<n>.` written `layer.*.`, each pattern once with its count, in the
/// order first seen.
fn fold_layers(names: &[String]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let folded: Vec<&str> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| if i > 0 && parts[i - 1] == "layer" && p.parse::<usize>().is_ok() { "*" } else { p })
            .collect();
        let pattern = folded.join(".");
        match out.iter_mut().find(|(p, _)| *p == pattern) {
            Some((_, n)) => *n += 1,
            None => out.push((pattern, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn layers_fold_into_one_pattern_with_a_count() {
        let names: Vec<String> = ["a.layer.0.x.weight", "a.layer.1.x.weight", "a.layer.10.x.weight", "b.weight"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            super::fold_layers(&names),
            vec![("a.layer.*.x.weight".to_string(), 3), ("b.weight".to_string(), 1)]
        );
    }
}
