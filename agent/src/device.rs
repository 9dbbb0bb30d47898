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

/// The launcher's environment that a bare `--device cuda` takes its index from.
#[derive(Clone, Debug, Default)]
pub struct LauncherEnv {
    /// `SLURM_LOCALID`: the task's index on its node under `srun`.
    pub slurm_localid: Option<String>,
    /// `LOCAL_RANK`: the same under torchrun-style launchers.
    pub local_rank: Option<String>,
    /// `CUDA_VISIBLE_DEVICES`: a launcher that binds one GPU per task leaves exactly one here.
    pub cuda_visible_devices: Option<String>,
}

impl LauncherEnv {
    /// Reads the three variables from the process environment (unset or not UTF-8: `None`).
    pub fn from_process() -> LauncherEnv {
        let var = |name: &str| std::env::var(name).ok();
        LauncherEnv {
            slurm_localid: var("SLURM_LOCALID"),
            local_rank: var("LOCAL_RANK"),
            cuda_visible_devices: var("CUDA_VISIBLE_DEVICES"),
        }
    }
}

/// The device `--device` names. An explicit index (`cuda:N`) is kept. A bare `cuda` or
/// `cuda-emu` is one of several tasks on a node, each meant to take its own GPU: the index is
/// `SLURM_LOCALID`, else `LOCAL_RANK`, else 0. A real GPU is 0 when `CUDA_VISIBLE_DEVICES`
/// lists a single device: the launcher already bound the task to it, and it is the only one
/// the task can see. A variable that is set but not a number is an error naming it.
pub fn resolve(flag: &str, env: &LauncherEnv) -> Result<LocalDevice, String> {
    let device: LocalDevice = flag.parse()?;
    let LocalDevice::Cuda(gpu) = device else { return Ok(device) };
    if flag.contains(':') {
        return Ok(device);
    }
    let from_var = |name: &str, value: &str| {
        value.trim().parse::<usize>().map_err(|_| {
            format!("{name}={value:?}: not a device index (a whole number); it picks the GPU of --device {flag}")
        })
    };
    let index = match (env.slurm_localid.as_deref(), env.local_rank.as_deref()) {
        (Some(v), _) => from_var("SLURM_LOCALID", v)?,
        (None, Some(v)) => from_var("LOCAL_RANK", v)?,
        (None, None) => 0,
    };
    let bound = env.cuda_visible_devices.as_deref().is_some_and(|v| !v.trim().is_empty() && !v.contains(','));
    let ordinal = if bound && !gpu.emulated { 0 } else { index };
    Ok(LocalDevice::Cuda(Gpu { ordinal, ..gpu }))
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

    fn env(slurm: Option<&str>, local: Option<&str>, visible: Option<&str>) -> LauncherEnv {
        let own = |v: Option<&str>| v.map(str::to_owned);
        LauncherEnv { slurm_localid: own(slurm), local_rank: own(local), cuda_visible_devices: own(visible) }
    }

    #[test]
    fn a_bare_cuda_takes_its_index_from_the_launcher() {
        let gpu = |ordinal, emulated| Ok(LocalDevice::Cuda(Gpu { ordinal, emulated }));
        assert_eq!(resolve("cuda", &env(None, None, None)), gpu(0, false));
        assert_eq!(resolve("cuda", &env(Some("3"), None, None)), gpu(3, false));
        assert_eq!(resolve("cuda", &env(None, Some("2"), None)), gpu(2, false));
        // SLURM_LOCALID wins over LOCAL_RANK; whitespace is tolerated.
        assert_eq!(resolve("cuda", &env(Some(" 1\n"), Some("5"), None)), gpu(1, false));
        assert_eq!(resolve("cuda-emu", &env(Some("1"), None, Some("7"))), gpu(1, true));
        // An explicit index is kept, whatever the launcher says (even a bad value).
        assert_eq!(resolve("cuda:4", &env(Some("1"), Some("x"), None)), gpu(4, false));
        assert_eq!(resolve("cuda:0", &env(Some("zz"), None, None)), gpu(0, false));
        assert_eq!(resolve("cpu", &env(Some("zz"), None, None)), Ok(LocalDevice::Cpu));
    }

    #[test]
    fn a_task_bound_to_one_visible_gpu_uses_index_0() {
        let gpu = |ordinal| Ok(LocalDevice::Cuda(Gpu::real(ordinal)));
        assert_eq!(resolve("cuda", &env(Some("3"), None, Some("GPU-5f2a"))), gpu(0));
        assert_eq!(resolve("cuda", &env(Some("3"), None, Some("0,1,2,3"))), gpu(3));
        assert_eq!(resolve("cuda", &env(Some("3"), None, Some(""))), gpu(3));
    }

    #[test]
    fn a_bad_launcher_variable_is_named() {
        for (e, name) in [
            (env(Some("one"), None, None), "SLURM_LOCALID"),
            (env(Some("-1"), Some("0"), None), "SLURM_LOCALID"),
            (env(None, Some(""), None), "LOCAL_RANK"),
            (env(None, Some("1.5"), Some("0")), "LOCAL_RANK"),
        ] {
            let err = resolve("cuda", &e).unwrap_err();
            assert!(err.starts_with(name), "{err}");
        }
        assert!(resolve("cuda:x", &env(None, None, None)).unwrap_err().contains("`cuda:x`"));
    }
}
