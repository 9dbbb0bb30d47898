use std::path::PathBuf;

/// Errors of the model crate. `Input` is the user's fault (exit code 2); the rest are failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the file and the key, tensor or line at fault.
    #[error("{}: {msg}", file.display())]
    Input { file: PathBuf, msg: String },
    #[error("{}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },
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
        Error::Io { file: file.into(), source }
    }
    /// True when the user can fix it by changing their input (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::Input { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;
