//! `--device cpu|cuda[:i]`: parsing, opening a backend, and what commands report about it.
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
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N")),
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

/// Open CUDA device `ordinal`. A machine without a driver (or without that device) is a usage
/// error, exit 2, with the backend's words ("no CUDA driver found; use --device cpu"); any
/// other failure to start (NVRTC, cuBLAS, out of memory) is exit 1.
pub fn open_cuda(ordinal: usize, precision: GemmPrecision) -> CliResult<Cuda> {
    match Cuda::new(ordinal, precision) {
        Ok(b) => {
            tracing::info!("opened {} ({precision:?} GEMMs)", b.name());
            Ok(b)
        }
        Err(KernelError::Unavailable(msg)) => Err(CliError::usage(msg)),
        Err(e) => Err(CliError { code: 1, error: anyhow::Error::new(e).context(format!("opening cuda:{ordinal}")) }),
    }
}
