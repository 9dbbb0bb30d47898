//! `bench --predict GPU`: the cost model. One training step runs on the CUDA backend with cost
//! recording on; every launch, cuBLAS call, memset, copy and host sync declares its bytes and
//! FLOPs ([`kernels::cuda::cost`]), and [`kernels::cuda::roofline`] prices the list on the named
//! GPU. On the virtual GPU the kernel bodies are skipped ([`cuda_emu::set_skip_bodies`]): the
//! launches are still checked and queued, so a bert-base step is predicted in seconds. On a
//! real GPU the step runs for real while it is recorded, and every entry is also timed with
//! CUDA events ([`Cuda::measure_launches`]): the table then shows measured next to predicted
//! microseconds, which is how the model gets checked against the hardware.
//!
//! `B2B_PREDICT_EXECUTE=1` runs (and times) the bodies on the virtual GPU too: tests compare
//! the two launch lists (skipping must change nothing but the time); the emulator's times mean
//! nothing about a GPU.

use kernels::cuda::cost::LaunchCost;
use kernels::cuda::roofline::{self, Gpu, Prediction, Row};
use model::checkpoint::Checkpoint;
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::optim::{AdamWConfig, Optimizer};
use model::{ModelConfig, ParamTable};

use super::{Args, step_flops, synthetic_batch};
use crate::device::{Cuda, LocalDevice};
use crate::{CliError, CliResult};

/// The GPU `--predict` names; a usage error for an unknown name or a device that cannot record.
pub fn target(a: &Args, name: &str) -> CliResult<Gpu> {
    let gpu = roofline::gpu(name).ok_or_else(|| CliError::usage(format!("--predict `{name}`: use h100 or h200")))?;
    if a.device == LocalDevice::Cpu {
        return Err(CliError::usage("--predict needs --device cuda-emu (or a real cuda device)"));
    }
    Ok(gpu)
}

/// All-zero weights: a prediction depends on the shapes only, and drawing bert-base's random
/// weights would take longer than the prediction.
pub fn zero_checkpoint(config: ModelConfig) -> Checkpoint {
    let table = ParamTable::new(&config);
    let params = vec![0.0f32; table.storage_len];
    Checkpoint { config, table, params }
}

/// Record one step (after one unrecorded warm-up step), predict it, print the table.
pub fn run(b: &Cuda, a: &Args, ck: &Checkpoint, gpu: Gpu) -> CliResult {
    let skip = cuda_emu::installed() && std::env::var("B2B_PREDICT_EXECUTE").as_deref() != Ok("1");
    if skip {
        cuda_emu::set_skip_bodies(true).map_err(|e| CliError::failure(format!("--predict: {e}")))?;
    }
    let (costs, measured) = record_step(b, a, ck, !skip)?;
    if skip {
        cuda_emu::set_skip_bodies(false).map_err(|e| CliError::failure(format!("--predict: {e}")))?;
    }
    let label_tokens = a.batch * a.tgt_len;
    let model_flops = step_flops(&ck.config, a.batch, a.src_len, a.tgt_len, label_tokens);
    let p = roofline::predict(&costs, gpu);
    let measured = measured.map(|m| by_kernel(&p.rows, &m));
    let activations = match kernels::Memory::activation_dtype(b) {
        kernels::Dtype::F32 => "fp32",
        kernels::Dtype::Bf16 => "bf16",
    };
    let report = Report {
        a,
        p: &p,
        model_flops,
        device: b_name(b),
        precision: &a.precision,
        activations,
        skipped: skip,
        measured,
    };
    if a.json {
        println!("{}", report.json())
    } else {
        report.print()
    }
    Ok(())
}

fn b_name(b: &Cuda) -> String {
    kernels::Memory::name(b)
}

/// Measured seconds per kernel name, in the order of `rows`, and the measured step.
struct Measured {
    seconds: Vec<f64>,
    step_s: f64,
}

fn by_kernel(rows: &[Row], timed: &[(LaunchCost, f64)]) -> Measured {
    let seconds: Vec<f64> =
        rows.iter().map(|r| timed.iter().filter(|(c, _)| c.kernel == r.kernel).map(|(_, s)| s).sum()).collect();
    Measured { step_s: seconds.iter().sum(), seconds }
}

/// Declared costs, and with `measure` measured seconds too.
type Recorded = (Vec<LaunchCost>, Option<Vec<(LaunchCost, f64)>>);

/// The declared costs of one full training step (zero grads, forward + backward, AdamW, the
/// closing synchronize), as `bench` times it; the batch is uploaded before, as in `bench`.
fn record_step(b: &Cuda, a: &Args, ck: &Checkpoint, measure: bool) -> CliResult<Recorded> {
    let (bs, s, t) = (a.batch, a.src_len, a.tgt_len);
    let batch = synthetic_batch(&ck.config, bs, s, t);
    let mut net = Bert2Bert::new(b, ck.config.clone(), ck.table.clone(), &ck.params)?;
    let mut opt = Optimizer::new(b, &ck.table, AdamWConfig::default())?;
    let x = Inputs::new(b, bs, s, t, &batch.src, &batch.mask, &batch.dec, &batch.labels)?;
    let scale = 1.0 / x.label_tokens() as f32;
    for step in 0..2u64 {
        b.record_costs(step == 1);
        b.measure_launches(step == 1 && measure);
        net.zero_grads(b)?;
        let opts = PassOptions { train: true, seed: step, label_smoothing: 0.0, grad_scale: Some(scale) };
        net.pass(b, &x, opts)?;
        net.update(b, &mut opt, 5e-5, 1.0)?;
        kernels::Memory::synchronize(b)?;
    }
    let recorded = if measure {
        let timed = b.take_measured()?;
        (timed.iter().map(|(c, _)| *c).collect(), Some(timed))
    } else {
        (b.take_costs(), None)
    };
    b.measure_launches(false);
    b.record_costs(false);
    Ok(recorded)
}

struct Report<'a> {
    a: &'a Args,
    p: &'a Prediction,
    model_flops: f64,
    device: String,
    precision: &'a str,
    /// The activation dtype the step ran with (`bf16` in mixed precision).
    activations: &'static str,
    skipped: bool,
    measured: Option<Measured>,
}

impl Report<'_> {
    fn tokens_per_s(&self, seconds: f64) -> f64 {
        (self.a.batch * (self.a.src_len + self.a.tgt_len)) as f64 / seconds
    }

    fn json(&self) -> serde_json::Value {
        let (p, a) = (self.p, self.a);
        let kernels: Vec<serde_json::Value> = p
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                serde_json::json!({
                    "kernel": r.kernel, "launches": r.launches, "bytes": r.bytes, "flops": r.flops,
                    "predicted_us": r.seconds * 1e6, "predicted_graph_us": r.graph_seconds * 1e6,
                    "share": r.seconds / p.step_s,
                    "measured_us": self.measured.as_ref().map(|m| m.seconds[i] * 1e6),
                })
            })
            .collect();
        serde_json::json!({
            "impl": "bert2bert", "device": self.device, "predict": p.gpu.name, "precision": self.precision,
            "activations": self.activations,
            "bodies_skipped": self.skipped,
            "batch": a.batch, "src_len": a.src_len, "tgt_len": a.tgt_len,
            "predicted_step_ms": p.step_s * 1e3, "predicted_graph_step_ms": p.graph_step_s * 1e3,
            "predicted_mfu": p.mfu(self.model_flops, p.step_s),
            "predicted_graph_mfu": p.mfu(self.model_flops, p.graph_step_s),
            "predicted_tokens_per_s": self.tokens_per_s(p.step_s),
            "flops_per_step": self.model_flops, "gemm_flops": p.gemm_flops,
            "launches": p.launches, "syncs": p.syncs,
            "measured_step_ms": self.measured.as_ref().map(|m| m.step_s * 1e3),
            "assumptions": {
                "memory_bandwidth": p.gpu.memory_bandwidth, "bf16_flops": p.gpu.bf16_flops,
                "fp32_flops": p.gpu.fp32_flops, "pcie_bandwidth": p.gpu.pcie_bandwidth,
                "launch_s": p.gpu.launch_s, "graph_launch_s": p.gpu.graph_launch_s, "sync_s": p.gpu.sync_s,
            },
            "kernels": kernels,
        })
    }

    fn print(&self) {
        let (p, a, g) = (self.p, self.a, &self.p.gpu);
        println!(
            "predicted step on {} ({:.2} TB/s, {:.0} TFLOP/s bf16 dense, {:.0} TFLOP/s fp32), recorded on {}",
            g.name,
            g.memory_bandwidth / 1e12,
            g.bf16_flops / 1e12,
            g.fp32_flops / 1e12,
            self.device
        );
        println!(
            "batch {} src {} tgt {}, {} GEMMs, {} activations",
            a.batch, a.src_len, a.tgt_len, self.precision, self.activations
        );
        let measured_head = if self.measured.is_some() { format!(" {:>10}", "meas µs") } else { String::new() };
        println!(
            "{:<32} {:>8} {:>10} {:>12} {:>10} {:>6}{measured_head}",
            "kernel", "launches", "GB", "GFLOP", "pred µs", "share"
        );
        for (i, r) in p.rows.iter().enumerate() {
            let measured = self.measured.as_ref().map(|m| format!(" {:>10.1}", m.seconds[i] * 1e6)).unwrap_or_default();
            println!(
                "{:<32} {:>8} {:>10.3} {:>12.1} {:>10.1} {:>5.1}%{measured}",
                r.kernel,
                r.launches,
                r.bytes as f64 / 1e9,
                r.flops as f64 / 1e9,
                r.seconds * 1e6,
                100.0 * r.seconds / p.step_s
            );
        }
        println!(
            "step {:.2} ms ({:.2} ms in a CUDA graph): {} launches, {} host syncs",
            p.step_s * 1e3,
            p.graph_step_s * 1e3,
            p.launches,
            p.syncs
        );
        println!(
            "MFU {:.1}% ({:.1}% in a graph), {:.0} tokens/s (source + target); model FLOPs {:.3e}, GEMM FLOPs launched {:.3e}",
            100.0 * p.mfu(self.model_flops, p.step_s),
            100.0 * p.mfu(self.model_flops, p.graph_step_s),
            self.tokens_per_s(p.step_s),
            self.model_flops,
            p.gemm_flops as f64
        );
        if let Some(m) = &self.measured {
            println!(
                "measured with CUDA events on {}: step {:.2} ms, MFU {:.1}%",
                self.device,
                m.step_s * 1e3,
                100.0 * p.mfu(self.model_flops, m.step_s)
            );
        }
        println!(
            "assumed: launch gap {:.2} µs ({:.2} µs in a graph), host sync {:.0} µs, pageable PCIe {:.0} GB/s",
            g.launch_s * 1e6,
            g.graph_launch_s * 1e6,
            g.sync_s * 1e6,
            g.pcie_bandwidth / 1e9
        );
    }
}
