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
