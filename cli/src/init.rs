//! `bert2bert init`: warm start an HF EncoderDecoderModel directory.

use std::path::PathBuf;

use model::{Variant, checkpoint, init, tokenizer::Tokenizer};

use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// HF BERT or RoBERTa directory (config.json, model.safetensors, tokenizer.json) for the encoder.
    #[arg(long)]
    encoder: PathBuf,
    /// HF BERT or RoBERTa directory for the decoder (its tokenizer.json too, when it has another
    /// vocabulary), or `random`.
    #[arg(long)]
    decoder: String,
    /// bert2bert | bertshare | bert2rnd | rnd2bert | rnd2rnd, or from RoBERTa: roberta2roberta |
    /// robertashare | roberta2rnd | rnd2roberta. The family is read from each config.json; a BERT
    /// encoder with a RoBERTa decoder (two vocabularies) is bert2bert.
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
    let (variant, family) = Variant::parse_named(&a.variant).ok_or_else(|| {
        CliError::usage(format!("--variant `{}`: use one of {}", a.variant, Variant::all_names().join(", ")))
    })?;
    let decoder_dir = if a.decoder == "random" {
        if variant.decoder_from_bert() {
            return Err(CliError::usage(format!(
                "--decoder random contradicts --variant {}: use a variant with a random decoder (bert2rnd, \
                 roberta2rnd, rnd2rnd), or give a checkpoint directory",
                a.variant
            )));
        }
        None
    } else {
        Some(PathBuf::from(&a.decoder))
    };
    // The decoder's tokenizer when it has its own vocabulary (a RoBERTa decoder under a BERT
    // encoder): its specials are the model's decoder start, pad and eos ids.
    let tok = match &decoder_dir {
        Some(d) => Tokenizer::from_checkpoints(&a.encoder, Some(d.as_path()))?,
        None => Tokenizer::from_file(&a.encoder.join("tokenizer.json"))?,
    };
    let (ck, report) =
        init::warm_start_with_report(&a.encoder, decoder_dir.as_deref(), variant, tok.special(), a.seed)?;
    check_family(&a.variant, family, variant, &ck.config)?;
    model::guards::check_tokenizer_fits(&ck.config, &tok)?;
    checkpoint::save_model_dir_opts(&a.out, &ck, Some(&tok), a.force)?;
    print_report(&report);
    tracing::info!(
        "wrote {} ({}, {} tensors, {:.1}M parameters)",
        a.out.display(),
        a.variant.to_ascii_lowercase(),
        ck.table.entries.len(),
        ck.table.storage_len as f64 / 1e6
    );
    Ok(())
}

/// The variant's name must say the family of the pre-trained sides (roberta2roberta for two
/// RoBERTa sides, bert2bert for BERT), so a name never hides which checkpoint was loaded. Sides
/// of two families (a BERT encoder, a RoBERTa decoder) have no name of their own: bert2bert.
fn check_family(name: &str, family: Option<&str>, variant: Variant, cfg: &model::ModelConfig) -> CliResult {
    let mut sides = Vec::new();
    if variant.encoder_from_bert() {
        sides.push(("--encoder", cfg.encoder.family.model_type()));
    }
    if variant.decoder_from_bert() {
        sides.push(("--decoder", cfg.decoder.family.model_type()));
    }
    let mixed = sides.windows(2).any(|w| w[0].1 != w[1].1);
    match (family, sides.iter().find(|(_, f)| Some(*f) != family)) {
        (Some(want), Some((flag, got))) if !mixed => Err(CliError::usage(format!(
            "--variant {name} needs {want} checkpoints, but {flag}'s config.json has model_type `{got}`: \
             use the {got} name of this layout ({})",
            same_layout_name(variant, got)
        ))),
        (Some("roberta"), Some(_)) => Err(CliError::usage(format!(
            "--variant {name}: the encoder and decoder checkpoints are of two families; name the layout bert2bert"
        ))),
        _ => Ok(()),
    }
}

fn same_layout_name(variant: Variant, family: &str) -> &'static str {
    match family {
        "roberta" => jobspec::ROBERTA_VARIANTS.iter().find(|(_, v)| *v == variant).map_or("", |(n, _)| *n),
        _ => variant.as_str(),
    }
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
