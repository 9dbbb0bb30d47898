//! `--device cpu|cuda[:i]`.

use crate::{CliError, CliResult};

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

impl Device {
    /// Refuse devices this build cannot drive, with the words users should see.
    pub fn require_cpu(self) -> CliResult<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(CliError::usage("this build has no CUDA backend yet; use --device cpu")),
        }
    }
}
