//! `--device cpu|cuda[:i]|cuda-emu[:i]` for the commands: the device and how to open it are the
//! agent crate's ([`agent::device`]); what commands report about a backend is here.
//!
//! Commands are written once, generic over [`DeviceInfo`] (a `kernels::Backend` that can also
//! say its name, memory use and peak throughput), and dispatch on the device like this:
//! ```ignore
//! match a.device {
//!     LocalDevice::Cpu => run_on(&Cpu, a),
//!     LocalDevice::Cuda(gpu) => run_on(&device::open_cuda(gpu, GemmPrecision::Bf16)?, a),
//! }
//! ```

use kernels::{Backend, Cpu};

pub use agent::device::{Cuda, GemmPrecision, Gpu, LocalDevice, gemm_precision};

use crate::CliResult;

/// Peak dense bf16 tensor-core throughput of an H100/H200 SXM (FLOP/s): the MFU denominator.
pub const H100_BF16_DENSE_FLOPS: f64 = 989e12;

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

/// Open CUDA device `gpu` ([`agent::device::open_cuda`]): no driver is exit 2, other failures 1.
pub fn open_cuda(gpu: Gpu, precision: GemmPrecision) -> CliResult<Cuda> {
    Ok(agent::device::open_cuda(gpu, precision)?)
}
