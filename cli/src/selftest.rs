//! `bert2bert selftest`: the conformance harness (the `conformance` crate) on one backend,
//! printed as a table or one JSON object. A device backend is compared with the CPU fp32
//! oracle; `--device cpu` is compared with the independent f64 reference (and finite
//! differences for the model step), so the CPU run can fail too.

use conformance::{Check, Reference, Tolerances};
use kernels::{Backend, Cpu};

use crate::device::{self, GemmPrecision, LocalDevice};
use crate::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// The backend to test: against the CPU fp32 oracle, or (`cpu`) against the f64 reference.
    #[arg(long, default_value = "cuda")]
    device: LocalDevice,
    /// Seed of the random inputs (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// GEMM precision of the device backend: fp32 (exact, fp32 tolerances everywhere) or bf16
    /// (the precision `bench` and training use: looser tolerances for GEMMs and the model step).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    precision: String,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

fn fmt_num(x: f64) -> String {
    if x.is_finite() { format!("{x:.2e}") } else { "inf".into() }
}

pub fn run(a: Args) -> CliResult {
    let bf16 = a.precision == "bf16";
    match a.device {
        LocalDevice::Cpu => run_on(&Cpu, &a, Reference::F64),
        // Exact fp32 GEMMs by default, so the comparison is at fp32 tolerances.
        LocalDevice::Cuda(i) => {
            let precision = if bf16 { GemmPrecision::Bf16 } else { GemmPrecision::Fp32 };
            run_on(&device::open_cuda(i, precision)?, &a, Reference::CpuFp32)
        }
    }
}

fn run_on<B: Backend>(dev: &B, a: &Args, oracle: Reference) -> CliResult {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let name = dev.name();
    if !a.json {
        println!(
            "selftest: {name} against {} at {} tolerances, seed {seed} (rerun with --seed {seed})",
            oracle.describe(),
            a.precision
        );
        println!("model step: {}", conformance::MODEL_STEP);
    }
    let t0 = std::time::Instant::now();
    let tol = Tolerances::new(a.precision == "bf16");
    let checks = conformance::run(dev, oracle, seed, tol);
    let secs = t0.elapsed().as_secs_f64();
    let failed = checks.iter().filter(|c| !c.pass).count();
    if a.json {
        let out = serde_json::json!({
            "device": name, "reference": oracle.name(), "seed": seed, "precision": a.precision, "checks": checks,
            "passed": failed == 0, "failures": failed, "seconds": secs,
        });
        println!("{out}");
    } else {
        print_table(&checks);
        println!("{} checks, {failed} failed, {secs:.1}s (seed {seed})", checks.len());
    }
    if failed > 0 {
        let total = checks.len();
        return Err(CliError::failure(format!("selftest: {failed} of {total} checks failed on {name} (seed {seed})")));
    }
    Ok(())
}

/// The table: one row per check, columns sized to the longest op and shape.
fn print_table(checks: &[Check]) {
    let w_op = checks.iter().map(|c| c.op.len()).max().unwrap_or(2).max(2);
    let w_shape = checks.iter().map(|c| c.shape.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<15} {:<w_op$} {:<w_shape$} {:>9} {:>9} {:>9}  result",
        "family", "op", "shape", "max_abs", "rel", "tol"
    );
    for c in checks {
        let res = if c.pass { "PASS" } else { "FAIL" };
        println!(
            "{:<15} {:<w_op$} {:<w_shape$} {:>9} {:>9} {:>9}  {res}{}",
            c.family,
            c.op,
            c.shape,
            fmt_num(c.max_abs),
            fmt_num(c.rel),
            fmt_num(c.tol),
            c.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default()
        );
    }
}
