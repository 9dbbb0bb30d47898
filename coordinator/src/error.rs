//! The coordinator's errors, and their one mapping onto gRPC status codes.

/// What can go wrong in the coordinator's domain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; the message starts with the field, e.g.
    /// `job_yaml: training.steps: must be at least 1, got 0`.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The operation does not fit the current state (e.g. cancelling a finished job).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A worker call without its worker's secret (or with another one).
    #[error("{0}")]
    Unauthenticated(String),
    /// A worker call about an attempt the worker is not a member of.
    #[error("{0}")]
    PermissionDenied(String),
    /// Too many requests of a kind at once (e.g. job files being checked); retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The embedded database failed.
    #[error("job store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(format!("{field}: {msg}"))
    }
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            Error::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Error::PermissionDenied(m) => tonic::Status::permission_denied(m),
            other => {
                tracing::error!("internal error: {other}");
                tonic::Status::internal(other.to_string())
            }
        }
    }
}
