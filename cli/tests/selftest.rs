//! `bert2bert selftest` through the real binary: the CPU against the f64 reference passes and covers
//! every op family, and `--device cuda` without a driver is a clean usage error.

mod common;

use common::run;
use serde_json::Value;

#[test]
fn cpu_selftest_passes_and_lists_every_op_family() {
    let o = run(&["selftest", "--device", "cpu", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let v: Value = serde_json::from_slice(&o.stdout).expect("selftest --json prints one JSON object");
    assert_eq!(v["passed"], true);
    assert_eq!(v["failures"], 0);
    assert!(v["seed"].as_u64().is_some());
    let checks = v["checks"].as_array().unwrap();
    for c in checks {
        assert_eq!(c["pass"], true, "{c}");
        assert!(c["rel"].as_f64().unwrap() <= c["tol"].as_f64().unwrap(), "{c}");
    }
    let has = |key: &str, want: &str| checks.iter().any(|c| c[key].as_str().is_some_and(|s| s.starts_with(want)));
    for family in [
        "GemmOps",
        "EmbeddingOps",
        "LayerNormOps",
        "ResidualNormOps",
        "GeluOps",
        "AttentionOps",
        "CrossEntropyOps",
        "DropoutOps",
        "ResidualOps",
        "OptimizerOps",
        "Memory",
        "model",
    ] {
        assert!(has("family", family), "no check of the {family} family");
    }
    for op in [
        "gemm_nn",
        "gemm_nt",
        "gemm_tn",
        "gemm_tt",
        "gemm_batched",
        "add_bias",
        "bias_grad",
        "embedding_forward",
        "embedding_backward",
        "layernorm_forward",
        "layernorm_backward.",
        "layernorm_backward+=",
        "residual_norm_forward.sum",
        "residual_norm_backward.d_x",
        "residual_norm_backward+=.d_skip",
        "bias_gelu_forward",
        "bias_gelu_backward",
        "attention_padded.dq",
        "attention_causal.dk",
        "attention_dropout.dv",
        "cross_entropy",
        "cross_entropy+grad.dlogits",
        "dropout_forward",
        "dropout_backward",
        "add",
        "add_assign",
        "scale",
        "adamw",
        "sum_squares",
        "clip_grad_norm_above.norm",
        "clip_grad_norm_above.grads",
        "clip_grad_norm_below.norm",
        "clip_grad_norm_below.grads",
        "adamw_flat_clipped",
        "adamw_flat_unclipped",
        "fill",
        "copy",
        "view_mut2",
        "loss (per token)",
        "grad decoder.bert.encoder.layer.1.crossattention.self.key.weight",
        "grad decoder.cls.predictions.bias",
        "grad norm",
        "adamw params",
        "loss step 2",
    ] {
        assert!(has("op", op), "no check of {op}");
    }
    // Attention forward compares only `out` (the saved state is backend-defined), so its check
    // carries the bare case name.
    assert!(checks.iter().any(|c| c["op"] == "attention_padded"), "no check of attention_padded's forward");
}

#[test]
fn cpu_selftest_table_and_seed_replay() {
    let a = run(&["selftest", "--device", "cpu", "--seed", "42"]);
    assert!(a.status.success());
    let text = String::from_utf8_lossy(&a.stdout);
    assert!(text.contains("seed 42"), "{text}");
    assert!(text.contains("0 failed"), "{text}");
    assert!(text.lines().any(|l| l.contains("attention_causal.dq") && l.trim_end().ends_with("PASS")), "{text}");
}

#[test]
fn cuda_without_a_driver_exits_2_with_the_message() {
    for args in [
        &["selftest", "--device", "cuda"][..],
        &["selftest", "--device", "cuda:3", "--json"],
        &["bench", "--config", "minilm", "--device", "cuda", "--steps", "1", "--json"],
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{err}");
        if o.status.success() {
            eprintln!("a CUDA driver and device are present here: nothing to check for {args:?}");
            return;
        }
        if err.contains("requested but") {
            // A driver, but fewer devices than asked for: still a usage error.
            assert_eq!(o.status.code(), Some(2), "{err}");
            continue;
        }
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("no CUDA driver found; use --device cpu"), "{err}");
        assert!(o.stdout.is_empty(), "no partial output on failure");
    }
}
