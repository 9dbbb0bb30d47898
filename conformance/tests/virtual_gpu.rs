//! The CUDA backend on the virtual GPU (the `cuda-emu` crate: the real kernels, an emulated
//! driver and cuBLAS) against the CPU fp32 oracle, with exact fp32 GEMMs, with bf16 GEMMs, and in
//! mixed precision (bf16 activations).
//! Needs NVRTC (the kernels are still compiled to PTX); without it the test skips, unless
//! `B2B_REQUIRE_NVRTC=1` (scripts/test.sh), where it fails.

use conformance::{Reference, Tolerances};
use kernels::cuda::{Cuda, GemmPrecision};
use kernels::{Cpu, Dtype};
use model::testing::head_chunks::ChunkCase;

#[test]
fn virtual_gpu_matches_the_cpu_oracle_in_fp32_and_bf16() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    cuda_emu::install().expect("starting the virtual GPU");
    // Exact fp32; bf16 GEMMs on fp32 storage; mixed precision (bf16 activations).
    for (precision, activations) in
        [(GemmPrecision::Fp32, Dtype::F32), (GemmPrecision::Bf16, Dtype::F32), (GemmPrecision::Bf16, Dtype::Bf16)]
    {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap();
        let dev = Cuda::new(0, precision).expect("the virtual GPU's CUDA backend");
        dev.set_activation_dtype(activations);
        let precision = (precision, activations);
        let tol = Tolerances::new(precision.0 == GemmPrecision::Bf16);
        let checks = conformance::run(&dev, Reference::CpuFp32, seed, tol);
        let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "{precision:?}, seed {seed}: {failed:#?}");
        for family in [
            "GemmOps",
            "LayerNormOps",
            "ResidualNormOps",
            "GeluOps",
            "AttentionOps",
            "EmbeddingOps",
            "OptimizerOps",
            "model",
        ] {
            assert!(checks.iter().any(|c| c.family == family), "{precision:?}: no {family} check");
        }
        for op in ["gemm_bias", "gemm_bias_grad.dbias", "gemm_bias_grad.dW", "gelu_forward", "gelu_backward"] {
            assert!(checks.iter().any(|c| c.op == op), "{precision:?}: no {op} check");
        }
        if activations == Dtype::Bf16 {
            assert!(checks.iter().any(|c| c.op == "adamw_flat_copy.copy"), "no check of AdamW's weight copy");
        }
        // The device differs from the oracle somewhere (it is not the oracle run twice).
        assert!(checks.iter().any(|c| c.rel > 0.0), "{precision:?}: every error is exactly zero");
    }
}

/// The LM head in chunks of 8 of its 37 label rows (the last 5) on the virtual GPU, with exact
/// fp32 GEMMs, against the CPU oracle's single chunk: losses, every gradient (accumulated onto
/// earlier ones) and the recomputed logits.
#[test]
fn chunked_lm_head_on_the_virtual_gpu_matches_one_cpu_chunk() {
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    cuda_emu::install().expect("starting the virtual GPU");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap();
    let case = ChunkCase::new(seed);
    let want = case.run(&Cpu, None).expect("the CPU pass");
    let dev = Cuda::new(0, GemmPrecision::Fp32).expect("the virtual GPU's CUDA backend");
    let got = case.run(&dev, Some(8)).expect("the virtual GPU pass");
    case.compare(&want, &got, 1e-4).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

/// The fused linear ops are one cuBLASLt launch each on the virtual GPU (its cuBLASLt has the
/// epilogues), not the unfused fallback, in both precisions.
#[test]
fn linear_epilogues_are_one_cublaslt_launch_each() {
    use kernels::{GemmOps, GemmShape, Memory, Operand};
    if !kernels::cuda::compile::nvrtc_or_skip() {
        return;
    }
    cuda_emu::install().expect("starting the virtual GPU");
    for (precision, bias, bgrad) in [
        (GemmPrecision::Fp32, "cublaslt_gemm_bias_fp32", "cublaslt_gemm_bgrad_fp32"),
        (GemmPrecision::Bf16, "cublaslt_gemm_bias_bf16", "cublaslt_gemm_bgrad_bf16"),
    ] {
        let dev = Cuda::new(0, precision).expect("the virtual GPU's CUDA backend");
        let (rows, i, o) = (37, 20, 13);
        let x = dev.activations(rows * i).unwrap();
        let wt = dev.activations(o * i).unwrap();
        let dy = dev.activations(rows * o).unwrap();
        let mut y = dev.activations(rows * o).unwrap();
        let mut grads = dev.zeros(o * i + o).unwrap();
        let b = dev.zeros(o).unwrap();
        dev.record_costs(true);
        let view = |buf| dev.view(buf, 0..dev.len(buf));
        dev.gemm_bias(GemmShape::plain(rows, o, i), view(&x), Operand::n(i), view(&wt), Operand::t(i), view(&b), {
            let n = dev.len(&y);
            dev.view_mut(&mut y, 0..n)
        })
        .unwrap();
        let (dw, db) = dev.view_mut2(&mut grads, 0..o * i, o * i..o * i + o);
        dev.gemm_bias_grad(GemmShape::plain(o, i, rows), view(&dy), Operand::t(o), view(&x), Operand::n(i), dw, db)
            .unwrap();
        let kernels: Vec<_> = dev.take_costs().iter().map(|c| c.kernel).collect();
        assert_eq!(kernels, [bias, bgrad], "{precision:?}");
    }
}
