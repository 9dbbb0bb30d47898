//! `bert2bert generate --model DIR`: read one source per line on stdin, write one output per line.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use kernels::Backend;
use model::ModelConfig;
use model::checkpoint;
use model::data::encode_source;
use model::job::{MAX_BEAMS, MAX_SEQ_LEN};
use model::net::{Bert2Bert, GenerateOptions, LengthPenaltyKind};
use model::tokenizer::Tokenizer;
use worker::evaluate::detokenize;

use crate::device::{self, GemmPrecision, LocalDevice};
use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// Beams (1 = greedy).
    #[arg(long, default_value_t = 4)]
    beams: usize,
    /// Most generated tokens.
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    #[arg(long, default_value_t = 0)]
    min_len: usize,
    /// Length penalty alpha.
    #[arg(long, default_value_t = 0.6)]
    length_penalty: f32,
    /// gnmt: ((5+len)/6)^alpha (Rothe et al.); hf: len^alpha (transformers).
    #[arg(long, default_value = "gnmt")]
    penalty: String,
    /// Ban repeated n-grams of this size (0: off).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Default 128, or the model's max_position_embeddings if smaller.
    #[arg(long)]
    max_source_len: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: LocalDevice,
}

/// The largest `--batch-size` of generate, eval and score: far past where batching stops
/// paying, and small enough that a typo cannot ask for gigabytes.
pub const MAX_BATCH_SIZE: usize = 4096;

/// Checked generation flags (shared by `generate` and `eval`); errors name the flag.
pub fn options(
    beams: usize,
    max_len: usize,
    min_len: usize,
    length_penalty: f32,
    penalty: &str,
    no_repeat: usize,
) -> CliResult<GenerateOptions> {
    let penalty_kind = match penalty {
        "gnmt" => LengthPenaltyKind::Gnmt,
        "hf" => LengthPenaltyKind::Hf,
        other => return Err(CliError::usage(format!("--penalty `{other}`: use gnmt or hf"))),
    };
    if !(1..=MAX_BEAMS).contains(&beams) {
        return Err(CliError::usage(format!("--beams must be in 1..={MAX_BEAMS}, got {beams}")));
    }
    if !(1..=MAX_SEQ_LEN).contains(&max_len) {
        return Err(CliError::usage(format!("--max-len must be in 1..={MAX_SEQ_LEN}, got {max_len}")));
    }
    if min_len > max_len {
        return Err(CliError::usage(format!("--min-len {min_len} exceeds --max-len {max_len}")));
    }
    if !length_penalty.is_finite() {
        return Err(CliError::usage(format!("--length-penalty must be a finite number, got {length_penalty}")));
    }
    Ok(GenerateOptions { beams, max_len, min_len, length_penalty, penalty_kind, no_repeat_ngram: no_repeat })
}

/// `--batch-size` in 1..=[`MAX_BATCH_SIZE`].
pub fn check_batch_size(batch_size: usize) -> CliResult {
    if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
        return Err(CliError::usage(format!("--batch-size must be in 1..={MAX_BATCH_SIZE}, got {batch_size}")));
    }
    Ok(())
}

/// The default `--max-source-len` / `--max-target-len` (a smaller model's position table
/// lowers it).
pub const DEFAULT_MAX_LEN: usize = 128;

/// A length flag checked against the model's position table before any batch is built: at
/// least `least`, at most `positions` (the encoder's or decoder's `max_position_embeddings`).
/// Unset, it is [`DEFAULT_MAX_LEN`] or the table's size if smaller.
pub fn length_flag(flag: &str, given: Option<usize>, least: usize, positions: usize) -> CliResult<usize> {
    let Some(v) = given else {
        return Ok(DEFAULT_MAX_LEN.min(positions));
    };
    if v < least {
        return Err(CliError::usage(format!("{flag} must be at least {least}, got {v}")));
    }
    if v > positions {
        return Err(CliError::usage(format!("{flag} {v} exceeds the model's max_position_embeddings ({positions})")));
    }
    Ok(v)
}

/// Beam search's buffers for `batch` sources of `src_len` tokens with `beams` beams each
/// (`net::generate`): per decoder layer the self-attention K/V cache of `max_len + 1`
/// positions and the cross-attention K/V, the encoder output per beam, and the logits. On the
/// CPU an allocation that fails aborts the process, so a request beyond the machine's
/// available memory is refused first, naming the flags.
pub fn check_generate_memory(
    cfg: &ModelConfig,
    batch: usize,
    beams: usize,
    max_len: usize,
    src_len: usize,
) -> CliResult {
    let d = &cfg.decoder;
    let rows = batch as f64 * beams as f64;
    let (c, layers) = (d.hidden_size as f64, d.num_hidden_layers as f64);
    let t = max_len as f64 + 1.0;
    let floats = rows * (layers * (2.0 * t + 2.0 * src_len as f64) * c + (t + 1.0) * c + src_len as f64 * c)
        + rows * d.vocab_size as f64;
    let need = 4.0 * floats;
    if let Some(have) = crate::bench::available_bytes()
        && need > have as f64
    {
        return Err(CliError::usage(format!(
            "--batch-size {batch} x --beams {beams} with --max-len {max_len} needs about {:.1} GB for beam search, \
             more than the {:.1} GB available",
            need / 1e9,
            have as f64 / 1e9
        )));
    }
    Ok(())
}

/// `--max-len` against the decoder's positions: `max_len` generated tokens take `max_len + 1`.
pub fn check_generate_len(cfg: &ModelConfig, max_len: usize) -> CliResult {
    let positions = cfg.max_lengths().1;
    if max_len >= positions {
        return Err(CliError::usage(format!(
            "--max-len {max_len} needs {} decoder positions; the model's max_position_embeddings is {positions}",
            max_len + 1
        )));
    }
    Ok(())
}

pub fn run(a: Args) -> CliResult {
    let opts = options(a.beams, a.max_len, a.min_len, a.length_penalty, &a.penalty, a.no_repeat_ngram)?;
    check_batch_size(a.batch_size)?;
    match a.device {
        LocalDevice::Cpu => generate_on(&kernels::Cpu, &a, &opts),
        LocalDevice::Cuda(i) => generate_on(&device::open_cuda(i, GemmPrecision::Fp32)?, &a, &opts),
    }
}

fn generate_on<B: Backend>(b: &B, a: &Args, opts: &GenerateOptions) -> CliResult {
    let ck = checkpoint::load_model_dir(&a.model)?;
    let max_source_len = length_flag("--max-source-len", a.max_source_len, 3, ck.config.max_lengths().0)?;
    check_generate_len(&ck.config, opts.max_len)?;
    let tok = Tokenizer::from_model_dir(&a.model)?;
    let ck_config = ck.config.clone();
    let mut net = Bert2Bert::new(b, ck.config, ck.table, &ck.params)?;
    let special = tok.source_special();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let lines: Vec<String> = stdin.lock().lines().collect::<Result<_, _>>()?;
    let rows = a.batch_size.min(lines.len()).max(1);
    check_generate_memory(&ck_config, rows, opts.beams, opts.max_len, max_source_len)?;
    for chunk in lines.chunks(a.batch_size) {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let rows: Vec<Vec<i32>> =
            tok.encode_source_batch(&texts)?.iter().map(|ids| encode_source(ids, special, max_source_len)).collect();
        for g in net.generate(b, &rows, opts)? {
            writeln!(out, "{}", detokenize(&tok, &g.tokens)?)?;
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beam_search_memory_is_checked_against_the_machine() {
        let cfg = crate::bench::builtin("bert-base").ok().unwrap();
        // 16 sources x 4 beams x 64 tokens: tens of MB.
        assert!(check_generate_memory(&cfg, 16, 4, 64, 128).is_ok());
        if crate::bench::available_bytes().is_some() {
            // 4096 x 64 rows with 512-position caches: hundreds of TB.
            let e = check_generate_memory(&cfg, 4096, 64, 511, 512).err().unwrap();
            assert_eq!(e.code(), 2);
            assert!(e.message().contains("--batch-size 4096 x --beams 64"), "{}", e.message());
        }
    }
}
