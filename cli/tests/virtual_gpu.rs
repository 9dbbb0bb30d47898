//! The CUDA backend end to end on the virtual GPU (`--device cuda-emu`, the `cuda-emu` crate):
//! the self-test command against the CPU oracle (the harness itself runs in both GEMM
//! precisions in `cargo test -p conformance`), and a tiny training job whose losses match the
//! CPU run's. Needs NVRTC (the kernels are still compiled to PTX); without it
//! the tests skip, unless `B2B_REQUIRE_NVRTC=1` (scripts/test.sh), where they fail.

mod common;

use std::path::Path;

use common::run_in;
use worker::tensorboard::read_scalars;

#[test]
fn selftest_passes_on_the_virtual_gpu_with_the_reversed_schedule() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The command end to end, with the reversed thread schedule (a kernel that needs a barrier
    // it lacks would differ from the index-order schedule the conformance tests run).
    for (precision, schedule) in [("fp32", "reverse")] {
        let seed = common::clock_seed().to_string();
        let o = common::exe()
            .args(["selftest", "--device", "cuda-emu", "--precision", precision, "--seed", &seed, "--json"])
            .env("B2B_EMU_SCHEDULE", schedule)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("selftest --json ({precision}): {e}\n{}", common::stderr(&o)));
        let checks = v["checks"].as_array().expect("checks");
        let failed: Vec<_> = checks.iter().filter(|c| c["pass"] != true).collect();
        assert!(o.status.success() && failed.is_empty(), "{precision} {schedule}, seed {seed}: failed {failed:#?}");
        // Every op family, forward and backward, and the model step were compared.
        for family in ["GemmOps", "LayerNormOps", "GeluOps", "AttentionOps", "EmbeddingOps", "model"] {
            assert!(checks.iter().any(|c| c["family"] == family), "{precision}: no {family} check");
        }
        // Gradient clipping (the norm read back from the device, then the scaling) is compared.
        for op in ["clip_grad_norm_above", "clip_grad_norm_below"] {
            assert!(checks.iter().any(|c| c["op"].as_str().is_some_and(|o| o.starts_with(op))), "{precision}: no {op}");
        }
    }
}

const JOB: &str = r#"
name: tiny
model: { init: b2b }
data: { train: train.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: 5, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 1, seed: 3, precision: PRECISION }
checkpoint: { dir: DIR, every_steps: 5, keep: 1 }
resources: { workers: 1, device: cpu }
"#;

fn losses(root: &Path, dir: &str) -> Vec<(i64, f32)> {
    let (scalars, _) = read_scalars(&root.join(dir).join("logs")).expect("TensorBoard logs");
    let mut v: Vec<_> = scalars.into_iter().filter(|s| s.tag == "train/loss").map(|s| (s.step, s.value)).collect();
    v.sort_by_key(|s| s.0);
    v
}

/// Train the same 5 steps on the CPU (fp32) and on the virtual GPU with `precision` GEMMs;
/// the losses agree within `tol` (relative).
fn train_matches_cpu(precision: &str, tol: f32) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model(root, 8);
    for (device, dir, p) in [("cpu", "ckpt-cpu", "fp32"), ("cuda", "ckpt-emu", precision)] {
        let job = JOB.replace("PRECISION", p).replace("DIR", dir).replace("device: cpu", &format!("device: {device}"));
        let device = if device == "cuda" { "cuda-emu" } else { device };
        std::fs::write(root.join(format!("{dir}.yaml")), job).unwrap();
        let o = run_in(&["train", &format!("{dir}.yaml"), "--device", device], root);
        assert!(o.status.success(), "train on {device}: {}", common::stderr(&o));
    }
    let (cpu, emu) = (losses(root, "ckpt-cpu"), losses(root, "ckpt-emu"));
    assert_eq!(cpu.iter().map(|l| l.0).collect::<Vec<_>>(), (1..=5).collect::<Vec<i64>>());
    assert_eq!(cpu.len(), emu.len());
    for ((step, c), (_, e)) in cpu.iter().zip(&emu) {
        assert!((c - e).abs() <= tol * c.abs(), "{precision} step {step}: cpu loss {c}, virtual GPU {e}");
    }
    if precision == "fp32" {
        the_other_commands_run_on_the_virtual_gpu(root);
    }
}

/// `eval`, `score`, `generate` and `bench` accept `--device cuda-emu` too; eval and score agree
/// with the CPU on the trained checkpoint.
fn the_other_commands_run_on_the_virtual_gpu(root: &Path) {
    let ckpt = "ckpt-emu/step-00000005";
    let json = |args: &[&str]| -> serde_json::Value {
        let o = run_in(args, root);
        assert!(o.status.success(), "{args:?}: {}", common::stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    for cmd in ["eval", "score"] {
        let mut args = vec![cmd, "--model", ckpt, "--data", "train.jsonl", "--json", "--device"];
        if cmd == "eval" {
            args.splice(1..1, ["--metrics", "bleu", "--beams", "1", "--max-len", "6"]);
        }
        let cpu = json(&[args.as_slice(), &["cpu"]].concat());
        let emu = json(&[args.as_slice(), &["cuda-emu"]].concat());
        let key = if cmd == "eval" { "loss" } else { "mean_loss" };
        let (c, e) = (cpu[key].as_f64().unwrap(), emu[key].as_f64().unwrap());
        assert!((c - e).abs() <= 1e-4 * c.abs(), "{cmd}: cpu loss {c}, virtual GPU {e}");
    }
    let mut child = common::exe()
        .args(["generate", "--model", ckpt, "--beams", "2", "--max-len", "5", "--device", "cuda-emu"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"In the beginning\nAnd God said\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "generate: {}", common::stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let b = json(&[
        "bench",
        "--model",
        ckpt,
        "--batch",
        "2",
        "--src-len",
        "9",
        "--tgt-len",
        "7",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--device",
        "cuda-emu",
        "--json",
    ]);
    assert!(b["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{b}");
}

#[test]
fn training_on_the_virtual_gpu_matches_the_cpu_losses() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    // fp32 GEMMs: the same sums in another order; bf16 GEMMs round their inputs.
    train_matches_cpu("fp32", 1e-4);
    train_matches_cpu("bf16", 2e-2);
}
