//! `bench --predict`: the cost model on the virtual GPU. Skipping kernel bodies must leave the
//! recorded launch list exactly as a run that executes them, the GEMMs launched plus the
//! attention must be the model FLOPs bench's MFU counts, and bad flags are usage errors. Needs NVRTC; without it the
//! tests skip, unless `B2B_REQUIRE_NVRTC=1` (scripts/test.sh), where they fail.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// (launches, bytes, flops) by kernel name.
type Launches = BTreeMap<String, (u64, u64, u64)>;

fn predict(root: &Path, precision: &str, execute: bool) -> Value {
    let o = common::exe()
        .args(["bench", "--model", "b2b", "--batch", "3", "--src-len", "9", "--tgt-len", "7"])
        .args(["--device", "cuda-emu", "--predict", "h100", "--json", "--precision", precision])
        .env("B2B_PREDICT_EXECUTE", if execute { "1" } else { "0" })
        .current_dir(root)
        .output()
        .unwrap();
    assert!(o.status.success(), "bench --predict: {}", common::stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::stdout(&o)))
}

fn launches(v: &Value) -> Launches {
    let field = |k: &Value, f: &str| k[f].as_u64().unwrap_or_else(|| panic!("{f} of {k}"));
    v["kernels"]
        .as_array()
        .expect("kernels")
        .iter()
        .map(|k| {
            (k["kernel"].as_str().unwrap().to_string(), (field(k, "launches"), field(k, "bytes"), field(k, "flops")))
        })
        .collect()
}

#[test]
fn skipping_kernel_bodies_changes_nothing_but_the_time() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    common::tiny_model(root, 2);
    let skipped = predict(root, "bf16", false);
    let executed = predict(root, "bf16", true);
    assert_eq!((skipped["bodies_skipped"].as_bool(), executed["bodies_skipped"].as_bool()), (Some(true), Some(false)));
    let list = launches(&skipped);
    assert_eq!(list, launches(&executed), "skipping bodies changed the launch list");
    assert_eq!(skipped["predicted_step_ms"], executed["predicted_step_ms"]);
    // Executed runs are also timed with CUDA events, per kernel; skipped ones are not.
    assert!(skipped["measured_step_ms"].is_null() && skipped["kernels"][0]["measured_us"].is_null());
    let kernels = executed["kernels"].as_array().unwrap();
    let per_kernel: f64 = kernels.iter().map(|k| k["measured_us"].as_f64().expect("measured_us")).sum();
    let step_ms = executed["measured_step_ms"].as_f64().expect("measured_step_ms");
    assert!(step_ms > 0.0 && (per_kernel / 1e3 - step_ms).abs() <= 1e-9 * step_ms, "{per_kernel} µs vs {step_ms} ms");
    // Mixed precision: the activation kernels run their bf16 entries; the GEMM copy of the
    // weights is made once a pass; the optimizer stays fp32.
    assert_eq!(skipped["activations"], "bf16");
    for k in [
        "cublas_gemm_bf16",
        "cublaslt_gemm_bias_bf16",
        "cublaslt_gemm_bgrad_bf16",
        "embedding_forward_bf16",
        "layernorm_forward_bf16",
        "layernorm_backward_bf16",
        "attention_flash_forward_bf16",
        "attention_flash_backward_dkdv_bf16",
        "attention_flash_backward_dq_bf16",
        "gelu_forward_bf16",
        "gelu_backward_bf16",
        "cross_entropy_forward_backward_bf16",
        "adamw_flat",
        "sync (synchronize)",
    ] {
        assert!(list.contains_key(k), "no {k} in {list:?}");
    }
    // The GEMMs launched plus the attention bench counts (`12 * B * Tq * Tk * C` an attention;
    // the fused attention kernels are not GEMMs) are exactly the model FLOPs of bench's analytic
    // count (the batch has no padding), so the MFU numerator and the launches agree.
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(root.join("b2b/config.json")).unwrap()).unwrap();
    let stack = |name: &str, f: &str| cfg[name][f].as_f64().unwrap_or_else(|| panic!("{name}.{f}"));
    let (b, s, t) = (3.0, 9.0, 7.0);
    let attention = 12.0
        * b
        * (stack("encoder", "num_hidden_layers") * s * s * stack("encoder", "hidden_size")
            + stack("decoder", "num_hidden_layers") * (t * t + t * s) * stack("decoder", "hidden_size"));
    let (gemm, model) = (skipped["gemm_flops"].as_f64().unwrap(), skipped["flops_per_step"].as_f64().unwrap());
    assert!((gemm + attention - model).abs() <= 1e-9 * model, "GEMMs {gemm} + attention {attention} vs {model}");
    let step_s = skipped["predicted_step_ms"].as_f64().unwrap() / 1e3;
    let tokens = skipped["predicted_tokens_per_s"].as_f64().unwrap();
    assert!((tokens * step_s - 3.0 * 16.0).abs() < 1e-6, "{tokens} tokens/s over {step_s} s");
    let mfu = skipped["predicted_mfu"].as_f64().unwrap();
    assert!(mfu > 0.0 && mfu < skipped["predicted_graph_mfu"].as_f64().unwrap(), "{skipped}");
    let shares: f64 = skipped["kernels"].as_array().unwrap().iter().map(|k| k["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-9, "shares add up to {shares}");

    // The text table shows the measured column only when the bodies ran.
    let text = |execute: &str| {
        let o = common::exe()
            .args(["bench", "--model", "b2b", "--batch", "2", "--src-len", "5", "--tgt-len", "4"])
            .args(["--device", "cuda-emu", "--predict", "h200"])
            .env("B2B_PREDICT_EXECUTE", execute)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::stderr(&o));
        common::stdout(&o)
    };
    let (ran, skipped_text) = (text("1"), text("0"));
    assert!(ran.contains("meas µs") && ran.contains("measured with CUDA events"), "{ran}");
    assert!(!skipped_text.contains("meas µs") && skipped_text.contains("predicted step on H200 SXM"), "{skipped_text}");
    eprintln!("{ran}");

    // fp32: the same launches under their fp32 names (no weight copy to make), each moving at
    // least the bytes of its bf16 twin, the GEMMs priced at the fp32 rate.
    let fp32 = predict(root, "fp32", false);
    assert_eq!(fp32["activations"], "fp32");
    let mut fp32_list = launches(&fp32);
    let gemms = fp32_list.remove("cublas_gemm_fp32").expect("fp32 GEMMs");
    // The cuBLASLt GEMMs (bias epilogues) carry their precision as a suffix too.
    let fp32_list: Launches = fp32_list
        .into_iter()
        .map(|(name, cost)| (name.strip_suffix("_fp32").map(str::to_string).unwrap_or(name), cost))
        .collect();
    let bf16_gemms = list.get("cublas_gemm_bf16").expect("bf16 GEMMs");
    assert_eq!((gemms.0, gemms.2), (bf16_gemms.0, bf16_gemms.2), "GEMM launches and FLOPs");
    assert!(gemms.1 > bf16_gemms.1, "fp32 GEMM operands move more bytes");
    let mut bf16_list = list.clone();
    bf16_list.remove("cublas_gemm_bf16");
    // AdamW wrote the weight copy in the step before: the recorded pass does not convert it.
    assert_eq!(bf16_list.remove("convert_f32_to_bf16"), None, "a steady step converts no weights");
    // ... and so AdamW moves the copy's bytes too (2 a parameter), the one launch that grows.
    let (adamw, adamw_fp32) = (bf16_list.remove("adamw_flat").unwrap(), fp32_list.get("adamw_flat").unwrap());
    assert_eq!((adamw.0, adamw.2), (adamw_fp32.0, adamw_fp32.2), "adamw_flat: launches and FLOPs");
    assert!(adamw.1 > adamw_fp32.1, "adamw_flat writes the bf16 copy too");
    let unsuffixed: Launches = bf16_list
        .into_iter()
        .map(|(name, cost)| (name.strip_suffix("_bf16").map(str::to_string).unwrap_or(name), cost))
        .collect();
    // The bf16 gather/scatter of the head's label rows are the fp32 embedding entries.
    let rows_ops = |l: &Launches, names: [&str; 2]| names.iter().map(|n| l.get(*n).map_or(0, |c| c.0)).sum::<u64>();
    assert_eq!(
        rows_ops(&fp32_list, ["embedding_forward", "embedding_backward"]),
        rows_ops(&unsuffixed, ["embedding_forward", "embedding_backward"])
            + rows_ops(&unsuffixed, ["embedding_gather", "embedding_scatter"])
    );
    for (name, (n, bytes, flops)) in &unsuffixed {
        if name.starts_with("embedding") || name == "memset" {
            continue;
        }
        let twin = fp32_list.get(name).unwrap_or_else(|| panic!("no fp32 twin of {name}"));
        assert_eq!((twin.0, twin.2), (*n, *flops), "{name}: launches and FLOPs");
        assert!(twin.1 >= *bytes, "{name}: fp32 moves at least the bf16 bytes");
    }
    // Nothing in fp32 is faster than its bf16 twin; AdamW's write of the weight copy is what
    // mixed precision pays extra (at bert-base it saves 7 ms: BENCHMARKS.md).
    let adamw_ms = |v: &Value| {
        v["kernels"].as_array().unwrap().iter().find(|k| k["kernel"] == "adamw_flat").unwrap()["predicted_us"]
            .as_f64()
            .unwrap()
            / 1e3
    };
    let extra = adamw_ms(&skipped) - adamw_ms(&fp32);
    let step_ms = |v: &Value| v["predicted_step_ms"].as_f64().unwrap();
    assert!(step_ms(&fp32) >= step_ms(&skipped) - extra, "{} vs {}", step_ms(&fp32), step_ms(&skipped));
}

#[test]
fn bad_predict_flags_are_usage_errors() {
    for (args, says) in [
        (&["--device", "cuda-emu", "--predict", "a100"][..], "--predict `a100`"),
        (&["--predict", "h100"][..], "--predict needs --device cuda-emu"),
    ] {
        let o = common::exe().args(["bench", "--config", "minilm"]).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", common::stderr(&o));
        assert!(common::stderr(&o).contains(says), "{args:?}: {}", common::stderr(&o));
    }
}
