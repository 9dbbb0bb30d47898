//! `bert2bert eval --model DIR --data FILE.jsonl`: loss and generation metrics of a model.

use std::path::PathBuf;

use kernels::Backend;
use model::checkpoint;
use model::data::{read_pairs, tokenize_pairs};
use model::net::Bert2Bert;
use model::tokenizer::Tokenizer;
use worker::evaluate::{EvalOptions, EvalResult, Scores, evaluate};

use crate::device::{self, GemmPrecision, LocalDevice};
use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Comma-separated: bleu, rouge (empty: loss only).
    #[arg(long, default_value = "bleu,rouge")]
    metrics: String,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 4)]
    beams: usize,
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    #[arg(long, default_value_t = 0.6)]
    length_penalty: f32,
    #[arg(long, default_value = "gnmt")]
    penalty: String,
    /// Generate for at most this many examples (all by default).
    #[arg(long)]
    max_examples: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Default 128, or the model's max_position_embeddings if smaller.
    #[arg(long)]
    max_source_len: Option<usize>,
    /// Default 128, or the model's max_position_embeddings if smaller.
    #[arg(long)]
    max_target_len: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: LocalDevice,
}

pub fn run(a: Args) -> CliResult {
    match a.device {
        LocalDevice::Cpu => eval_on(&kernels::Cpu, &a),
        LocalDevice::Cuda(i) => eval_on(&device::open_cuda(i, GemmPrecision::Fp32)?, &a),
    }
}

fn eval_on<B: Backend>(b: &B, a: &Args) -> CliResult {
    let (mut bleu, mut rouge) = (false, false);
    for m in a.metrics.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        match m {
            "bleu" => bleu = true,
            "rouge" => rouge = true,
            other => return Err(CliError::usage(format!("--metrics: unknown metric `{other}` (use bleu, rouge)"))),
        }
    }
    let gen_opts = crate::generate::options(a.beams, a.max_len, 0, a.length_penalty, &a.penalty, 0)?;
    crate::generate::check_batch_size(a.batch_size)?;
    let ck = checkpoint::load_model_dir(&a.model)?;
    let (enc_positions, dec_positions) = ck.config.max_lengths();
    let max_source_len = crate::generate::length_flag("--max-source-len", a.max_source_len, 3, enc_positions)?;
    let max_target_len = crate::generate::length_flag("--max-target-len", a.max_target_len, 2, dec_positions)?;
    if bleu || rouge {
        crate::generate::check_generate_len(&ck.config, gen_opts.max_len)?;
    }
    let tok = Tokenizer::from_model_dir(&a.model)?;
    let pairs = read_pairs(&a.data, "source", "target")?;
    if bleu || rouge {
        let rows = a.batch_size.min(pairs.len()).max(1);
        crate::generate::check_generate_memory(&ck.config, rows, a.beams, a.max_len, max_source_len)?;
    }
    let (src, tgt) = tokenize_pairs(&tok, &pairs)?;
    let mut net = Bert2Bert::new(b, ck.config, ck.table, &ck.params)?;
    let opts = EvalOptions {
        batch_size: a.batch_size,
        max_source_len,
        max_target_len,
        generate: (bleu || rouge).then_some(gen_opts),
        max_generate: a.max_examples.unwrap_or(pairs.len()),
        bleu,
        rouge,
    };
    let r = evaluate(b, &mut net, &tok, &pairs, &src, &tgt, &opts)?;
    if a.json {
        println!("{}", json_report(&r));
    } else {
        print_report(&r);
    }
    Ok(())
}

fn scores_json(s: &Scores) -> serde_json::Value {
    serde_json::json!({
        "bleu": s.bleu,
        "rouge1": s.rouge.map(|x| x.rouge1), "rouge2": s.rouge.map(|x| x.rouge2), "rougeL": s.rouge.map(|x| x.rouge_l),
    })
}

fn json_report(r: &EvalResult) -> serde_json::Value {
    let d = r.diversity.as_ref();
    serde_json::json!({
        "loss": r.loss, "tokens": r.tokens,
        "bleu": r.bleu,
        "rouge1": r.rouge.map(|x| x.rouge1), "rouge2": r.rouge.map(|x| x.rouge2), "rougeL": r.rouge.map(|x| x.rouge_l),
        "identical_share": d.map(|d| d.identical),
        "distinct1": d.map(|d| d.distinct1), "distinct2": d.map(|d| d.distinct2),
        "collapsed": d.map(|d| d.collapsed()),
        "baselines": r.baselines.map(|b| serde_json::json!({
            "copy": scores_json(&b.copy), "lead": scores_json(&b.lead), "lead_words": b.lead_words,
        })),
    })
}

/// One `name<TAB>model[<TAB>copy<TAB>lead]` line per score, so the baselines sit beside it.
fn print_report(r: &EvalResult) {
    println!("loss\t{:.4}\t({} tokens)", r.loss, r.tokens);
    let b = r.baselines.as_ref();
    if let Some(b) = b {
        println!("metric\tmodel\tcopy\tlead-{}", b.lead_words);
    }
    let line = |name: &str, model: Option<f64>, pick: &dyn Fn(&Scores) -> Option<f64>| {
        if let Some(x) = model {
            match b {
                Some(b) => {
                    println!("{name}\t{x:.2}\t{:.2}\t{:.2}", pick(&b.copy).unwrap_or(0.0), pick(&b.lead).unwrap_or(0.0))
                }
                None => println!("{name}\t{x:.2}"),
            }
        }
    };
    line("bleu", r.bleu, &|s| s.bleu);
    line("rouge1", r.rouge.map(|x| x.rouge1), &|s| s.rouge.map(|x| x.rouge1));
    line("rouge2", r.rouge.map(|x| x.rouge2), &|s| s.rouge.map(|x| x.rouge2));
    line("rougeL", r.rouge.map(|x| x.rouge_l), &|s| s.rouge.map(|x| x.rouge_l));
    if let Some(d) = &r.diversity {
        println!("identical\t{:.3}\ndistinct1\t{:.3}\ndistinct2\t{:.3}", d.identical, d.distinct1, d.distinct2);
        if d.collapsed() {
            println!(
                "warning: {:.0}% of the generations are the same text: the model ignores its input (collapse)",
                100.0 * d.identical
            );
        }
    }
    if let (Some(b), Some(x)) = (b, r.bleu.zip(r.baselines.and_then(|b| b.copy.bleu))) {
        if x.0 < x.1 {
            println!(
                "note: BLEU {:.2} is below copying the source ({:.2}); lead-{} scores {:.2}",
                x.0,
                x.1,
                b.lead_words,
                b.lead.bleu.unwrap_or(0.0)
            );
        }
    }
    for s in &r.samples {
        println!("---\nsource: {}\noutput: {}\ntarget: {}", s.source, s.hypothesis, s.reference);
    }
}
