//! `--device cpu|cuda[:i]|cuda-emu[:i]`: parsing, opening a backend, and what commands report about it.
//!
//! Commands are written once, generic over [`DeviceInfo`] (a `kernels::Backend` that can also
//! say its name, memory use and peak throughput), and dispatch on the device like this:
//! ```ignore
//! match a.device {
//!     Device::Cpu => run_on(&Cpu, a),
//!     Device::Cuda(i) => run_on(&device::open_cuda(i, GemmPrecision::Bf16)?, a),
//! }
//! ```

use kernels::{Backend, Cpu, KernelError, Memory};

pub use kernels::cuda::{Cuda, GemmPrecision};

use crate::{CliError, CliResult};

/// Peak dense bf16 tensor-core throughput of an H100/H200 SXM (FLOP/s): the MFU denominator.
pub const H100_BF16_DENSE_FLOPS: f64 = 989e12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(Gpu),
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

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device `{s}`: use cpu, cuda, cuda:N, cuda-emu or cuda-emu:N");
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => (kind, n.parse::<usize>().map_err(|_| bad())?),
            None => (s, 0),
        };
        match kind {
            "cpu" if ordinal == 0 && !s.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(Gpu { ordinal, emulated: false })),
            "cuda-emu" => Ok(Device::Cuda(Gpu { ordinal, emulated: true })),
            _ => Err(bad()),
        }
    }
}

/// What commands report about a backend beyond its op families.
pub trait DeviceInfo: Backend {
    /// Device memory in use now (bytes), where the backend has device memory.
    fn used_bytes(&self) -> Option<u64>;
    /// Peak dense bf16 throughput (FLOP/s) that MFU is measured against; `None` on the CPU.
    fn peak_flops(&self) -> Option<f64>;
}

impl DeviceInfo for Cpu {
    fn used_bytes(&self) -> Option<u64> {
        None
    }
    fn peak_flops(&self) -> Option<f64> {
        None
    }
}

impl DeviceInfo for Cuda {
    fn used_bytes(&self) -> Option<u64> {
        Cuda::used_bytes(self)
    }
    fn peak_flops(&self) -> Option<f64> {
        Some(H100_BF16_DENSE_FLOPS)
    }
}

/// Open CUDA device `gpu`. A machine without a driver (or without that device) is a usage
/// error, exit 2, with the backend's words ("no CUDA driver found; use --device cpu"); any
/// other failure to start (NVRTC, cuBLAS, out of memory) is exit 1. The virtual GPU is
/// loaded into the process first when `gpu` is emulated, and only then.
pub fn open_cuda(gpu: Gpu, precision: GemmPrecision) -> CliResult<Cuda> {
    if gpu.emulated {
        cuda_emu::install()
            .map_err(|e| CliError { code: 1, error: anyhow::anyhow!("starting the virtual GPU: {e}") })?;
    } else if cuda_emu::installed() {
        return Err(CliError::usage(
            "this process runs on the virtual GPU (cuda-emu); a real cuda device cannot join it",
        ));
    }
    let ordinal = gpu.ordinal;
    match Cuda::new(ordinal, precision) {
        Ok(b) => {
            tracing::info!("opened {} ({precision:?} GEMMs)", b.name());
            Ok(b)
        }
        Err(KernelError::Unavailable(msg)) => Err(CliError::usage(msg)),
        Err(e) => Err(CliError { code: 1, error: anyhow::Error::new(e).context(format!("opening {gpu}")) }),
    }
}
