use std::path::PathBuf;

/// Errors of the model crate. `Input` is the user's fault (exit code 2); the rest are failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the file and the key, tensor or line at fault.
    #[error("{}: {msg}", file.display())]
    Input { file: PathBuf, msg: String },
    /// Not named `source` on purpose: the message already carries the OS error, and as a
    /// `source` it would be printed a second time by error-chain printers (`{:#}`).
    #[error("{}: {err}", file.display())]
    Io { file: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn input(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Input { file: file.into(), msg: msg.into() }
    }
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { file: file.into(), err: source }
    }
    /// True when the user can fix it by changing their input (exit code 2): bad contents, or a
    /// path that names no file.
    pub fn is_bad_input(&self) -> bool {
        use std::io::ErrorKind::{NotADirectory, NotFound};
        match self {
            Error::Input { .. } => true,
            Error::Io { err, .. } => matches!(err.kind(), NotFound | NotADirectory),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

// Generic error printing, shared with the coordinator through `jobspec`.
pub use jobspec::error::{chain, redact_quoted};

/// Job-file errors keep their kind: an input error stays one (exit code 2).
impl From<jobspec::Error> for Error {
    fn from(e: jobspec::Error) -> Self {
        match e {
            jobspec::Error::Input { file, msg } => Error::Input { file, msg },
            jobspec::Error::Io { file, err } => Error::Io { file, err },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_bad_input_and_says_the_os_error_once() {
        let e = Error::io("/no/such", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(e.is_bad_input());
        assert!(std::error::Error::source(&e).is_none(), "the OS error would print twice");
        let printed = chain(&e);
        assert_eq!(printed.matches("not found").count(), 1, "{printed}");
        let e = Error::io("/dev/full", std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(!e.is_bad_input());
    }
}
