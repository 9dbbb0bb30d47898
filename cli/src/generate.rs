//! `bert2bert generate --model DIR`: read one source per line on stdin, write one output per line.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use kernels::Backend;
use model::checkpoint;
use model::net::{Bert2Bert, GenerateOptions, LengthPenaltyKind};
use model::tokenizer::Tokenizer;
use worker::evaluate::{detokenize, source_row};

use crate::device::{self, Device, GemmPrecision};
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
    #[arg(long, default_value_t = 128)]
    max_source_len: usize,
    #[arg(long, default_value = "cpu")]
    device: Device,
}

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
    if beams == 0 || max_len == 0 {
        return Err(CliError::usage("--beams and --max-len must be at least 1"));
    }
    Ok(GenerateOptions { beams, max_len, min_len, length_penalty, penalty_kind, no_repeat_ngram: no_repeat })
}

pub fn run(a: Args) -> CliResult {
    let opts = options(a.beams, a.max_len, a.min_len, a.length_penalty, &a.penalty, a.no_repeat_ngram)?;
    match a.device {
        Device::Cpu => generate_on(&kernels::Cpu, &a, &opts),
        Device::Cuda(i) => generate_on(&device::open_cuda(i, GemmPrecision::Fp32)?, &a, &opts),
    }
}

fn generate_on<B: Backend>(b: &B, a: &Args, opts: &GenerateOptions) -> CliResult {
    let ck = checkpoint::load_model_dir(&a.model)?;
    let tok = Tokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let mut net = Bert2Bert::new(b, ck.config, ck.table, &ck.params)?;
    let special = tok.special();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let lines: Vec<String> = stdin.lock().lines().collect::<Result<_, _>>()?;
    for chunk in lines.chunks(a.batch_size.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let rows: Vec<Vec<i32>> =
            tok.encode_batch(&texts)?.iter().map(|ids| source_row(ids, special, a.max_source_len)).collect();
        for g in net.generate(b, &rows, opts)? {
            writeln!(out, "{}", detokenize(&tok, &g.tokens)?)?;
        }
        out.flush()?;
    }
    Ok(())
}
