//! `bert2bert train JOB.yaml`: run a job locally, with a progress bar, evaluation lines and
//! checkpoints; resumes from the job's newest valid checkpoint.

use std::path::PathBuf;
use std::time::Instant;

use kernels::Backend;
use kernels::collective::Single;
use model::job::{self, JobModelExt, JobSpec};
use worker::tensorboard::{TrainLog, recording};
use worker::{Event, Trainer};

use crate::device::{self, LocalDevice, gemm_precision};
use crate::{CliError, CliResult, Context};

#[derive(clap::Args)]
pub struct Args {
    /// The job file (YAML).
    job: PathBuf,
    /// Local worker processes; above 1, a coordinator runs in this process with N `bert2bert
    /// worker` child processes (CPU only).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Overrides `resources.device` of the job.
    #[arg(long)]
    device: Option<LocalDevice>,
    /// Validation examples to generate for BLEU/ROUGE at each evaluation.
    #[arg(long, default_value_t = 100)]
    eval_examples: usize,
}

pub fn run(a: Args) -> CliResult {
    let spec = JobSpec::from_file(&a.job)?;
    // Lengths beyond the model's position table fail here (exit 2), not at the first long example.
    spec.check_against_model()?;
    if a.workers == 0 {
        return Err(CliError::usage("--workers must be at least 1"));
    }
    if a.workers > 1 {
        if a.device.is_some_and(|d| d != LocalDevice::Cpu) {
            return Err(CliError::usage("--workers above 1 runs CPU workers only in this build"));
        }
        return crate::local::run(spec, a.workers);
    }
    let device = a.device.unwrap_or(match spec.resources.device {
        job::Device::Cpu => LocalDevice::Cpu,
        job::Device::Cuda => LocalDevice::Cuda(device::Gpu::real(0)),
    });
    match device {
        LocalDevice::Cpu => train_on(&kernels::Cpu, spec, a.eval_examples),
        LocalDevice::Cuda(i) => train_on(&device::open_cuda(i, gemm_precision(&spec))?, spec, a.eval_examples),
    }
}

fn train_on<B: Backend>(b: &B, spec: JobSpec, eval_examples: usize) -> CliResult {
    let name = spec.name.clone();
    let (mut trainer, resumed) = Trainer::new(b, &Single, spec)?;
    if let Some(Event::Resumed { step, from }) = &resumed {
        eprintln!("resumed from {} (step {step})", from.display());
    }
    let log_dir = trainer.job.logging.dir.clone();
    let mut curves = TrainLog::create(&log_dir, trainer.step, 1)
        .context(format!("logging.dir {}: cannot write TensorBoard events", log_dir.display()))?;
    let total = trainer.job.training.steps;
    let bar = crate::progress(total, &name);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:25}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step);
    let t0 = Instant::now();
    let (mut tokens, mut last_eval) = (0usize, None);
    // Without a terminal the bar is hidden: print lines instead, and a step line now and then.
    let say = |bar: &indicatif::ProgressBar, line: String| {
        if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) }
    };
    let mut last_line = Instant::now();
    let mut on_event = recording(Some(&mut curves), |e| match e {
        Event::Step(s) => {
            tokens += s.tokens;
            let tps = tokens as f64 / t0.elapsed().as_secs_f64();
            let msg = format!("loss {:.4} lr {:.2e} gnorm {:.2} {:.0} tok/s", s.loss, s.lr, s.grad_norm, tps);
            if bar.is_hidden() && (last_line.elapsed().as_secs() >= 10 || s.step == s.total_steps) {
                eprintln!("step {}/{}: {msg}", s.step, s.total_steps);
                last_line = Instant::now();
            }
            bar.set_message(msg);
            bar.set_position(s.step);
            tracing::debug!(step = s.step, loss = s.loss, lr = s.lr, grad_norm = s.grad_norm, "step");
        }
        Event::Eval { step, result } => {
            let mut line = format!("step {step}: validation loss {:.4}", result.loss);
            if let Some(bleu) = result.bleu {
                line.push_str(&format!(", BLEU {bleu:.2}"));
            }
            if let Some(r) = result.rouge {
                line.push_str(&format!(", ROUGE-1/2/L {:.2}/{:.2}/{:.2}", r.rouge1, r.rouge2, r.rouge_l));
            }
            say(&bar, line);
            if let Some(d) = result.diversity.filter(|d| d.collapsed()) {
                say(&bar, collapse_warning(*step, d.identical));
            }
            if let Some(s) = result.samples.first() {
                say(&bar, format!("  source: {}\n  output: {}\n  target: {}", s.source, s.hypothesis, s.reference));
            }
            last_eval = Some(result.clone());
        }
        Event::Checkpoint { step, dir } => say(&bar, format!("step {step}: checkpoint {}", dir.display())),
        Event::Resumed { .. } => {}
    });
    trainer.run(None, eval_examples, &mut on_event)?;
    drop(on_event);
    bar.finish_and_clear();
    eprintln!("done: {} steps in {:.1}s", trainer.step, t0.elapsed().as_secs_f64());
    if let Some(r) = last_eval {
        eprintln!(
            "final validation loss {:.4}{}",
            r.loss,
            r.bleu.map(|b| format!(", BLEU {b:.2}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// The line `train` prints when more than half of the validation generations are one text.
fn collapse_warning(step: u64, identical: f64) -> String {
    format!(
        "step {step}: warning: {:.0}% of the validation generations are the same text: the model ignores \
         its input (collapse). Check that labels are masked and the decoder start and pad ids are set.",
        100.0 * identical
    )
}
