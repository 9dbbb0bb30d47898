//! The agent's error: its variant says whose fault it is, which the CLI turns into an exit code
//! and the agent into the `input_error`/`kind` of a failure report.

use std::fmt::Display;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad settings or bad input: a flag, a job's key, path or data file, a path outside the
    /// allowed roots, a machine without the requested device, a refused token. Exit code 2; as
    /// a job's failure, the job is at fault and is not retried.
    #[error("{0}")]
    Usage(String),
    /// Anything else (the coordinator unreachable, a peer lost, a STOP): exit code 1.
    #[error("{0}")]
    Failure(String),
}

pub type Result<T = (), E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn usage(msg: impl Into<String>) -> Error {
        Error::Usage(msg.into())
    }

    pub fn failure(msg: impl Into<String>) -> Error {
        Error::Failure(msg.into())
    }

    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }

    /// 2 for [`Error::Usage`], 1 for [`Error::Failure`].
    pub fn exit_code(&self) -> u8 {
        if self.is_usage() { 2 } else { 1 }
    }

    /// `what: self`, of the same kind.
    pub fn context(self, what: impl Display) -> Error {
        match self {
            Error::Usage(m) => Error::Usage(format!("{what}: {m}")),
            Error::Failure(m) => Error::Failure(format!("{what}: {m}")),
        }
    }
}

/// A model error is usage when the input is at fault (`is_bad_input`); its sources are kept in
/// the message, as `a: b: c`.
impl From<model::Error> for Error {
    fn from(e: model::Error) -> Error {
        let msg = jobspec::chain(&e);
        if e.is_bad_input() { Error::Usage(msg) } else { Error::Failure(msg) }
    }
}

/// Job-file errors are the model's bad input.
impl From<jobspec::Error> for Error {
    fn from(e: jobspec::Error) -> Error {
        model::Error::from(e).into()
    }
}

/// A backend that is not there (no driver, no such device) is usage; anything else a failure.
impl From<kernels::KernelError> for Error {
    fn from(e: kernels::KernelError) -> Error {
        let unavailable = matches!(e, kernels::KernelError::Unavailable(_));
        let msg = jobspec::chain(&e);
        if unavailable { Error::Usage(msg) } else { Error::Failure(msg) }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Failure(jobspec::chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_exit_codes_and_context_keeps_the_kind() {
        let u = Error::usage("--device tpu").context("worker");
        assert_eq!((u.exit_code(), u.to_string()), (2, "worker: --device tpu".to_owned()));
        let f = Error::from(std::io::Error::other("boom")).context("ring");
        assert_eq!((f.exit_code(), f.to_string()), (1, "ring: boom".to_owned()));
        assert_eq!(Error::from(kernels::KernelError::Unavailable("no CUDA driver".into())).exit_code(), 2);
        assert_eq!(Error::from(kernels::KernelError::Device("bad".into())).exit_code(), 1);
    }
}
