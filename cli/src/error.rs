//! The CLI's one error type and its exit-code contract: 1 failure, 2 bad usage or bad input.
//!
//! Commands build errors only through [`CliError::usage`], [`CliError::failure`], the `From`
//! impls below (so that `?` on a library error picks its exit code here, in one place) and
//! [`Context::context`], which prefixes a message and keeps the code. `main` prints each error
//! once, as `error: <context>: <cause>`.

use std::fmt::Display;

/// A failure with the exit code it deserves.
pub struct CliError {
    code: u8,
    error: anyhow::Error,
}

pub type CliResult<T = ()> = Result<T, CliError>;

const FAILURE: u8 = 1;
const USAGE: u8 = 2;

impl CliError {
    /// Bad flags or bad input: exit 2.
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError { code: USAGE, error: anyhow::anyhow!(msg.into()) }
    }

    /// Anything else that went wrong: exit 1.
    pub fn failure(msg: impl Into<String>) -> Self {
        CliError { code: FAILURE, error: anyhow::anyhow!(msg.into()) }
    }

    /// The process exit code.
    pub fn code(&self) -> u8 {
        self.code
    }

    /// What `main` prints after `error: `: the message and its causes, outermost first.
    pub fn message(&self) -> String {
        format!("{:#}", self.error)
    }

    fn with(code: u8, error: impl Into<anyhow::Error>) -> Self {
        CliError { code, error: error.into() }
    }
}

/// Adds what was being done to an error, keeping its exit code: `read(p).context("reading p")?`.
pub trait Context<T> {
    fn context(self, what: impl Display) -> CliResult<T>;
}

impl<T, E: Into<CliError>> Context<T> for Result<T, E> {
    fn context(self, what: impl Display) -> CliResult<T> {
        self.map_err(|e| {
            let e = e.into();
            CliError { code: e.code, error: e.error.context(what.to_string()) }
        })
    }
}

impl From<model::Error> for CliError {
    fn from(e: model::Error) -> Self {
        CliError::with(if e.is_bad_input() { USAGE } else { FAILURE }, e)
    }
}

/// Job-file errors (`jobspec`) exit as the model's do: 2 for bad input.
impl From<jobspec::Error> for CliError {
    fn from(e: jobspec::Error) -> Self {
        model::Error::from(e).into()
    }
}

/// No such backend in this build or on this machine is a usage error.
impl From<kernels::KernelError> for CliError {
    fn from(e: kernels::KernelError) -> Self {
        let code = if matches!(e, kernels::KernelError::Unavailable(_)) { USAGE } else { FAILURE };
        CliError::with(code, e)
    }
}

/// The agent's (and its client helpers') errors say usage (2) or failure (1).
impl From<agent::Error> for CliError {
    fn from(e: agent::Error) -> Self {
        CliError::with(e.exit_code(), e)
    }
}

/// A coordinator refusing its configuration (`InvalidArgument`) is a usage error.
impl From<coordinator::Error> for CliError {
    fn from(e: coordinator::Error) -> Self {
        let code = if matches!(e, coordinator::Error::InvalidArgument(_)) { USAGE } else { FAILURE };
        CliError::with(code, e)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::with(FAILURE, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_carry_the_exit_code_contract() {
        assert_eq!(CliError::usage("bad flag").code(), 2);
        assert_eq!(CliError::failure("it broke").code(), 1);
        let io = std::io::Error::other("disk gone");
        assert_eq!(CliError::from(io).code(), 1);
        let refused = coordinator::Error::InvalidArgument("listen: bad".into());
        assert_eq!(CliError::from(refused).code(), 2);
    }

    #[test]
    fn context_prefixes_the_message_and_keeps_the_code() {
        let usage: CliResult = Err(CliError::usage("--x must be positive"));
        let e = usage.context("reading flags").unwrap_err();
        assert_eq!((e.code(), e.message().as_str()), (2, "reading flags: --x must be positive"));
        let io: Result<(), std::io::Error> = Err(std::io::Error::other("permission denied"));
        let e = io.context(format!("logging.dir {}", "/x")).unwrap_err();
        assert_eq!((e.code(), e.message().as_str()), (1, "logging.dir /x: permission denied"));
    }
}
