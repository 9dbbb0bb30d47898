//! The device this process runs on (`--device cpu|cuda[:i]|cuda-emu[:i]`): parsing it and opening
//! its backend. [`jobspec::Device`] is the device *kind* a job asks for and a worker registers;
//! [`LocalDevice`] is one concrete device of this machine, with its ordinal and whether it is the
//! virtual GPU.
//!
//! Commands dispatch on it like this:
//! ```ignore
//! match device {
//!     LocalDevice::Cpu => run_on(&Cpu, a),
//!     LocalDevice::Cuda(gpu) => run_on(&device::open_cuda(gpu, GemmPrecision::Bf16)?, a),
//! }
//! ```

use jobspec::{JobSpec, Precision};
use kernels::{KernelError, Memory};

pub use kernels::cuda::{Cuda, GemmPrecision};

use crate::error::{Error, Result};

/// One device of this machine that a backend can be opened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalDevice {
    Cpu,
    Cuda(Gpu),
}

impl LocalDevice {
    /// The kind of device this is, as jobs and the coordinator name it.
    pub fn kind(self) -> jobspec::Device {
        match self {
            LocalDevice::Cpu => jobspec::Device::Cpu,
            LocalDevice::Cuda(_) => jobspec::Device::Cuda,
        }
    }
}

/// A CUDA device: a real one, or the virtual GPU (`cuda-emu`, the emulator in the `cuda-emu`
/// crate), which runs the same backend, kernels and NCCL calls on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub ordinal: usize,
    pub emulated: bool,
}

impl Gpu {
    pub fn real(ordinal: usize) -> Self {
        Gpu { ordinal, emulated: false }
    }
}

impl std::fmt::Display for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", if self.emulated { "cuda-emu" } else { "cuda" }, self.ordinal)
    }
}

impl std::str::FromStr for LocalDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device `{s}`: use cpu, cuda, cuda:N, cuda-emu or cuda-emu:N");
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => (kind, n.parse::<usize>().map_err(|_| bad())?),
            None => (s, 0),
        };
        match kind {
            "cpu" if ordinal == 0 && !s.contains(':') => Ok(LocalDevice::Cpu),
            "cuda" => Ok(LocalDevice::Cuda(Gpu { ordinal, emulated: false })),
            "cuda-emu" => Ok(LocalDevice::Cuda(Gpu { ordinal, emulated: true })),
            _ => Err(bad()),
        }
    }
}

/// Open CUDA device `gpu`. A machine without a driver (or without that device) is a usage
/// error, exit 2, with the backend's words ("no CUDA driver found; use --device cpu"); any
/// other failure to start (NVRTC, cuBLAS, out of memory) is exit 1. The virtual GPU is
/// loaded into the process first when `gpu` is emulated, and only then.
pub fn open_cuda(gpu: Gpu, precision: GemmPrecision) -> Result<Cuda> {
    if gpu.emulated {
        cuda_emu::install().map_err(|e| Error::failure(format!("starting the virtual GPU: {e}")))?;
    } else if cuda_emu::installed() {
        return Err(Error::usage("this process runs on the virtual GPU (cuda-emu); a real cuda device cannot join it"));
    }
    match Cuda::new(gpu.ordinal, precision) {
        Ok(b) => {
            tracing::info!("opened {} ({precision:?} GEMMs)", b.name());
            Ok(b)
        }
        Err(KernelError::Unavailable(msg)) => Err(Error::Usage(msg)),
        Err(e) => Err(Error::from(e).context(format!("opening {gpu}"))),
    }
}

/// The CUDA GEMM precision a job trains at: its `training.precision` (bf16 by default on cuda).
/// `train --device cuda` and `worker --device cuda` both use this, so a job multiplies alike
/// wherever it runs.
pub fn gemm_precision(spec: &JobSpec) -> GemmPrecision {
    match spec.precision() {
        Precision::Bf16 => GemmPrecision::Bf16,
        Precision::Fp32 => GemmPrecision::Fp32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_with_their_ordinals_and_kinds() {
        let gpu = |ordinal, emulated| LocalDevice::Cuda(Gpu { ordinal, emulated });
        assert_eq!("cpu".parse(), Ok(LocalDevice::Cpu));
        assert_eq!("cuda".parse(), Ok(gpu(0, false)));
        assert_eq!("cuda:3".parse(), Ok(gpu(3, false)));
        assert_eq!("cuda-emu:1".parse(), Ok(gpu(1, true)));
        for bad in ["cpu:0", "cuda:x", "tpu", "", "cuda:-1"] {
            let e = bad.parse::<LocalDevice>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert_eq!(gpu(2, true).kind(), jobspec::Device::Cuda);
        assert_eq!(LocalDevice::Cpu.kind(), jobspec::Device::Cpu);
        assert_eq!(Gpu { ordinal: 2, emulated: true }.to_string(), "cuda-emu:2");
    }
}
