//! The roofline: a predicted step time from a list of declared launch costs ([`super::cost`]).
//!
//! Each entry takes `max(bytes / bandwidth, flops / peak) + overhead`, summed in queue order
//! (one stream, so nothing overlaps):
//! - the peak is picked by the work: bf16 tensor cores for `GemmPrecision::Bf16` GEMMs, the
//!   fp32 CUDA-core rate for `Fp32` GEMMs (`CUBLAS_COMPUTE_32F` does not use tensor cores) and
//!   for our own kernels, except that a `TensorKernel` (fused attention on mma.sync) prices its
//!   dot-product FLOPs at the bf16 peak and only its softmax share at the fp32 rate;
//! - the overhead is the launch gap between dependent kernels on one stream, without and with a
//!   CUDA graph; copies pay it too, and cross PCIe at the pageable rate;
//! - a host sync is a fixed bubble in both cases (a graph cannot remove it: the syncs have to
//!   go first, which is the point of showing both numbers).
//!
//! Adding the overhead to every launch is pessimistic for long kernels (the CPU could queue the
//! next launch while one runs), but those are milliseconds long, where microseconds do not
//! matter; for the short kernels, which dominate the launch count, it is about right.

use super::GemmPrecision;
use super::cost::{LaunchCost, Work};

/// The figures a prediction uses; all in bytes/s, FLOP/s and seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    /// HBM bandwidth.
    pub memory_bandwidth: f64,
    /// Dense bf16 tensor-core peak (also the MFU denominator).
    pub bf16_flops: f64,
    /// FP32 CUDA-core peak (non-tensor): our kernels and fp32-compute GEMMs.
    pub fp32_flops: f64,
    /// Pageable host<->device copies.
    pub pcie_bandwidth: f64,
    /// Per-launch gap without a graph.
    pub launch_s: f64,
    /// Per-launch gap inside a CUDA graph.
    pub graph_launch_s: f64,
    /// One host synchronisation: the GPU drains, the host reads, the next launch restarts it.
    pub sync_s: f64,
}

/// Assumptions shared by the H100 and H200 figures (not datasheet numbers): a
/// `cuLaunchKernel` gap of ~2.5 µs and ~0.75 µs per node of an instantiated graph (the usual
/// order of magnitude measured on Hopper; NVIDIA's CUDA Graphs blog shows the per-kernel
/// saving); a sync bubble of ~15 µs (the drain, the host's turn-around and the first launch
/// after it); pageable PCIe Gen5 copies at ~25 GB/s (under half of the 64 GB/s link, as
/// staging through pinned buffers costs). `bench --device cuda` on a real GPU is where these
/// get checked.
const LAUNCH_S: f64 = 2.5e-6;
const GRAPH_LAUNCH_S: f64 = 0.75e-6;
const SYNC_S: f64 = 15e-6;
const PAGEABLE_PCIE: f64 = 25e9;

/// H100 SXM5 80GB (NVIDIA H100 datasheet): 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 67 TFLOP/s
/// fp32.
pub const H100: Gpu = Gpu {
    name: "H100 SXM",
    memory_bandwidth: 3.35e12,
    bf16_flops: 989e12,
    fp32_flops: 67e12,
    pcie_bandwidth: PAGEABLE_PCIE,
    launch_s: LAUNCH_S,
    graph_launch_s: GRAPH_LAUNCH_S,
    sync_s: SYNC_S,
};

/// H200 SXM 141GB (NVIDIA H200 datasheet): the H100's compute with 4.8 TB/s HBM3e.
pub const H200: Gpu = Gpu { name: "H200 SXM", memory_bandwidth: 4.8e12, ..H100 };

/// The GPU `--predict NAME` names (`h100`, `h200`), case-insensitive.
pub fn gpu(name: &str) -> Option<Gpu> {
    match name.to_ascii_lowercase().as_str() {
        "h100" => Some(H100),
        "h200" => Some(H200),
        _ => None,
    }
}

impl Gpu {
    /// Predicted seconds of one entry, with or without a graph.
    pub fn seconds(&self, c: &LaunchCost, graph: bool) -> f64 {
        let gap = if graph { self.graph_launch_s } else { self.launch_s };
        let (bytes, flops) = (c.bytes as f64, c.flops as f64);
        let memory = bytes / self.memory_bandwidth;
        match c.work {
            Work::Kernel | Work::Gemm(GemmPrecision::Fp32) => memory.max(flops / self.fp32_flops) + gap,
            Work::Gemm(GemmPrecision::Bf16) => memory.max(flops / self.bf16_flops) + gap,
            Work::TensorKernel { simt_flops } => {
                let simt = simt_flops as f64;
                memory.max((flops - simt) / self.bf16_flops + simt / self.fp32_flops) + gap
            }
            Work::Memory => memory + gap,
            Work::HostCopy => bytes / self.pcie_bandwidth + gap,
            Work::Sync => self.sync_s,
        }
    }
}

/// One kernel name's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub kernel: &'static str,
    pub launches: u64,
    pub bytes: u64,
    pub flops: u64,
    /// Predicted seconds without a graph, all launches together.
    pub seconds: f64,
    /// As `seconds`, inside a CUDA graph.
    pub graph_seconds: f64,
}

/// A predicted step: per-kernel rows (slowest first) and the totals.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub gpu: Gpu,
    pub rows: Vec<Row>,
    pub step_s: f64,
    pub graph_step_s: f64,
    pub launches: u64,
    pub syncs: u64,
    /// FLOPs of the GEMMs (the model's useful work as launched).
    pub gemm_flops: u64,
}

/// Price every entry of `costs` on `gpu` and group them by kernel name.
pub fn predict(costs: &[LaunchCost], gpu: Gpu) -> Prediction {
    let mut rows: Vec<Row> = Vec::new();
    let (mut launches, mut syncs, mut gemm_flops) = (0, 0, 0);
    for c in costs {
        let i = match rows.iter().position(|r| r.kernel == c.kernel) {
            Some(i) => i,
            None => {
                rows.push(Row { kernel: c.kernel, launches: 0, bytes: 0, flops: 0, seconds: 0.0, graph_seconds: 0.0 });
                rows.len() - 1
            }
        };
        let r = &mut rows[i];
        r.launches += 1;
        r.bytes += c.bytes;
        r.flops += c.flops;
        r.seconds += gpu.seconds(c, false);
        r.graph_seconds += gpu.seconds(c, true);
        match c.work {
            Work::Sync => syncs += 1,
            Work::Gemm(_) => {
                gemm_flops += c.flops;
                launches += 1
            }
            _ => launches += 1,
        }
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let step_s = rows.iter().map(|r| r.seconds).sum();
    let graph_step_s = rows.iter().map(|r| r.graph_seconds).sum();
    Prediction { gpu, rows, step_s, graph_step_s, launches, syncs, gemm_flops }
}

impl Prediction {
    /// Model FLOPs utilisation of `model_flops` in `seconds` against the bf16 dense peak.
    pub fn mfu(&self, model_flops: f64, seconds: f64) -> f64 {
        model_flops / (seconds * self.gpu.bf16_flops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::cost;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1e-12)
    }

    #[test]
    fn each_entry_takes_its_roof_plus_its_overhead() {
        let g = H100;
        // A bf16 GEMM of exactly 989 GFLOP: 1 ms of tensor-core time, tiny traffic.
        let gemm =
            LaunchCost { kernel: "g", work: Work::Gemm(GemmPrecision::Bf16), bytes: 1000, flops: 989_000_000_000 };
        assert!(close(g.seconds(&gemm, false), 1e-3 + 2.5e-6));
        assert!(close(g.seconds(&gemm, true), 1e-3 + 0.75e-6));
        // The same GEMM at fp32 compute runs at 67 TFLOP/s.
        let fp32 = LaunchCost { work: Work::Gemm(GemmPrecision::Fp32), ..gemm };
        assert!(close(g.seconds(&fp32, false), 989e9 / 67e12 + 2.5e-6));
        // A kernel moving 3.35 GB: 1 ms of HBM time whatever its few FLOPs.
        let k = cost::LaunchCost::kernel("k", 3_350_000_000, 1000);
        assert!(close(g.seconds(&k, false), 1e-3 + 2.5e-6));
        assert!(close(H200.seconds(&k, false), 3.35 / 4.8 * 1e-3 + 2.5e-6));
        // 25 MB over pageable PCIe: 1 ms.
        assert!(close(g.seconds(&cost::host_copy("h", 25_000_000), true), 1e-3 + 0.75e-6));
        assert!(close(g.seconds(&cost::sync("s"), true), 15e-6));
        // A tensor-core kernel: 989 GFLOP on tensor cores (1 ms) plus 67 GFLOP on CUDA cores (1 ms).
        let mma = cost::LaunchCost::tensor_kernel("a", 1000, 989_000_000_000 + 67_000_000_000, 67_000_000_000);
        assert!(close(g.seconds(&mma, false), 2e-3 + 2.5e-6));
    }

    #[test]
    fn a_step_groups_by_kernel_sums_and_sorts_slowest_first() {
        let small = cost::LaunchCost::kernel("small", 335_000, 10); // 0.1 µs of traffic
        let big = cost::LaunchCost::kernel("big", 33_500_000, 10); // 10 µs
        let list = [small, big, small, cost::sync("sync"), small];
        let p = predict(&list, H100);
        assert_eq!(p.rows.iter().map(|r| r.kernel).collect::<Vec<_>>(), ["sync", "big", "small"]);
        let s = &p.rows[2];
        assert_eq!((s.launches, s.bytes, s.flops), (3, 1_005_000, 30));
        assert!(close(s.seconds, 3.0 * (0.1e-6 + 2.5e-6)));
        assert!(close(p.step_s, 3.0 * 2.6e-6 + 12.5e-6 + 15e-6));
        assert!(close(p.graph_step_s, 3.0 * 0.85e-6 + 10.75e-6 + 15e-6));
        assert_eq!((p.launches, p.syncs, p.gemm_flops), (4, 1, 0));
        // 989 GFLOP in 2 ms is 50% of the bf16 peak.
        assert!(close(p.mfu(989e9, 2e-3), 0.5));
    }

    #[test]
    fn gpus_are_named_case_insensitively() {
        assert_eq!(gpu("H100"), Some(H100));
        assert_eq!(gpu("h200").map(|g| g.memory_bandwidth), Some(4.8e12));
        assert_eq!(gpu("a100"), None);
    }
}
