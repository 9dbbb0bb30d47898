//! Helper for scripts/soak.sh, so that the soak needs no downloads:
//!
//!   soak_fixture model DIR      a tiny random BERT (config, weights, tokenizer) in DIR/bert and
//!                               training pairs in DIR/train.jsonl
//!   soak_fixture verify ROOT    checks the manifest of every `step-N` checkpoint under ROOT;
//!                               prints `STEP ok` per checkpoint, exits 1 on the first damaged one

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["model", dir] => {
            let dir = Path::new(dir);
            let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos());
            model::testing::write_bert_dir(&dir.join("bert"), seed as u64, None);
            model::testing::write_pairs(&dir.join("train.jsonl"), 16);
            ExitCode::SUCCESS
        }
        ["verify", root] => {
            let all = worker::state::list_checkpoints(Path::new(root));
            if all.is_empty() {
                eprintln!("{root}: no checkpoints");
                return ExitCode::FAILURE;
            }
            for (step, dir) in all {
                if let Err(e) = worker::state::verify_manifest(&dir) {
                    eprintln!("{}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                println!("{step} ok");
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: soak_fixture model DIR | soak_fixture verify CHECKPOINT_ROOT");
            ExitCode::from(2)
        }
    }
}
