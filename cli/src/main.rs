//! The single `bert2bert` binary. This is the only place that sets up tracing, reads the
//! environment and prints errors; their exit codes (0 ok, 1 failure, 2 bad usage or bad input)
//! are decided in `error`.

mod bench;
mod device;
mod error;
mod eval;
mod generate;
mod init;
mod local;
mod plot;
mod remote;
mod score;
mod selftest;
mod serve;
mod tls;
mod train;
mod watch;
mod worker_agent;

pub use error::{CliError, CliResult, Context};

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bert2bert", version, about = "Fine-tune BERT2BERT sequence-to-sequence models (Rothe et al. 2020)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Warm-start an HF EncoderDecoderModel directory from HF BERT checkpoints.
    Init(init::Args),
    /// Per-example mean token cross-entropy of a data file (eval mode), optionally gradients.
    Score(score::Args),
    /// Time forward + backward + AdamW steps on synthetic batches.
    Bench(bench::Args),
    /// Every op of a backend against the CPU oracle, then a whole training step.
    Selftest(selftest::Args),
    /// Run a training job (YAML) locally; resumes from its newest valid checkpoint.
    Train(train::Args),
    /// Draw a job's loss curves (its TensorBoard event files) to a PNG.
    Plot(plot::Args),
    /// Generate targets for source lines read on stdin.
    Generate(generate::Args),
    /// Loss and BLEU/ROUGE of a model on a data file.
    Eval(eval::Args),
    /// Serve the job and worker gRPC APIs (jobs persist in --state).
    Coordinator(serve::Args),
    /// Submit a job file to a coordinator; prints the job id.
    Submit(remote::SubmitArgs),
    /// Follow a job to its end: a live progress bar on a terminal, plain lines otherwise.
    Watch(remote::WatchArgs),
    /// Show one job of a coordinator.
    Status(remote::StatusArgs),
    /// List a coordinator's jobs, newest first.
    List(remote::ListArgs),
    /// Cancel a job; its workers stop.
    Cancel(remote::CancelArgs),
    /// Forget an ended job (it leaves `list`; its id is never reused).
    Delete(remote::DeleteArgs),
    /// Run a worker agent: register with a coordinator and train the jobs it assigns.
    Worker(worker_agent::Args),
    /// Print a shell completion script, e.g. `bert2bert completions bash > /etc/bash_completion.d/bert2bert`.
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BERT2BERT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(a) => init::run(a),
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Train(a) => train::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Coordinator(a) => serve::run(a),
        Command::Submit(a) => remote::submit(a),
        Command::Watch(a) => remote::watch(a),
        Command::Status(a) => remote::status(a),
        Command::List(a) => remote::list(a),
        Command::Cancel(a) => remote::cancel(a),
        Command::Delete(a) => remote::delete(a),
        Command::Worker(a) => worker_agent::run(a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "bert2bert", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message());
            ExitCode::from(e.code())
        }
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
