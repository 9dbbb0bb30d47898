//! The CUDA backend on a real GPU against the CPU fp32 oracle, at fp32 and bf16 GEMM
//! precision. Runs wherever a CUDA driver and device are present; elsewhere it prints
//! "SKIPPED", and with `B2B_REQUIRE_GPU=1` (set it on GPU machines) a missing GPU fails the
//! test instead, so it cannot pass silently where it was meant to run.

use conformance::{Reference, Tolerances};
use kernels::KernelError;
use kernels::cuda::{Cuda, GemmPrecision};

#[test]
fn real_gpu_matches_the_cpu_oracle_in_fp32_and_bf16() {
    for precision in [GemmPrecision::Fp32, GemmPrecision::Bf16] {
        let dev = match Cuda::new(0, precision) {
            Ok(dev) => dev,
            Err(KernelError::Unavailable(why)) => {
                let required = std::env::var("B2B_REQUIRE_GPU").as_deref() == Ok("1");
                assert!(!required, "B2B_REQUIRE_GPU=1 but no GPU: {why}");
                eprintln!("SKIPPED: no real GPU ({why}); set B2B_REQUIRE_GPU=1 to make this a failure");
                return;
            }
            Err(e) => panic!("opening GPU 0: {e}"),
        };
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap();
        eprintln!("{} {precision:?}, seed {seed}", dev.device_name());
        let checks =
            conformance::run(&dev, Reference::CpuFp32, seed, Tolerances::new(precision == GemmPrecision::Bf16));
        let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "{precision:?}, seed {seed}: {failed:#?}");
        assert!(checks.iter().any(|c| c.family == "model"), "no model-step check");
    }
}
