//! Errors of reading and checking a job file, and helpers to print errors safely.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// `Input` is the user's fault (exit code 2); `Io` is a failure to read, which is the user's
/// fault only when the path names no file (see [`Error::is_bad_input`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the file and the key or line at fault.
    #[error("{}: {msg}", file.display())]
    Input { file: PathBuf, msg: String },
    /// Not named `source` on purpose: the message already carries the OS error, and as a
    /// `source` it would be printed a second time by error-chain printers (`{:#}`).
    #[error("{}: {err}", file.display())]
    Io { file: PathBuf, err: std::io::Error },
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
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `path` opened if it is a regular file: devices such as /dev/zero never end, a FIFO blocks
/// the open, a directory fails late: all are refused, naming the file, before anything is
/// read. The check runs before the open so that a FIFO is never opened; the opened file is
/// checked again.
pub fn open_regular(path: &Path) -> Result<File> {
    let not_regular = || Error::input(path, "not a regular file (a device, FIFO, socket or directory)");
    if !std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
        return Err(not_regular());
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    if !file.metadata().map_err(|e| Error::io(path, e))?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
}

/// The whole of a regular file of at most `max` bytes; a longer file is an input error naming
/// the limit (nothing past `max` is read).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(Error::input(path, format!("larger than the limit of {max} bytes")));
    }
    Ok(bytes)
}

/// An error and its sources, `a: b: c` (what `anyhow`'s `{:#}` prints).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(&format!(": {s}"));
        next = s.source();
    }
    out
}

/// `msg` with whatever a parser quoted from its input (between `"` or backticks) replaced by
/// `…`: serde's typed errors quote the offending value (`invalid type: string "…"`), and a file
/// a job points at must not come back to the client through an error.
pub fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut open: Option<char> = None;
    for c in msg.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '`' {
                    open = Some(c);
                }
            }
        }
    }
    if open.is_some() {
        out.push('…');
    }
    out
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

    #[test]
    fn quoted_input_is_redacted() {
        let msg = r#"invalid type: string "SECRET", expected u32 at line 1 column 9; unknown variant `KEY`"#;
        let out = redact_quoted(msg);
        assert_eq!(out, r#"invalid type: string "…", expected u32 at line 1 column 9; unknown variant `…`"#);
        assert_eq!(redact_quoted("open \"SECRET"), "open \"…");
    }
}
