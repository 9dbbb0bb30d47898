//! Reaching the coordinator as a gRPC client: the channel (with TLS for an `https://` URL), the
//! bearer-token interceptor, and what a failed call means (usage or failure). `bert2bert worker`
//! and the CLI's JobService clients (`submit`, `status`, `watch`, ...) share these.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::error::{Error, Result};

/// TLS files for an `https://` coordinator: the CA its certificate must chain to, and a client
/// certificate and key for a coordinator that requires mutual TLS.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Adds `authorization: Bearer <token>` to every request (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// `Bearer <token>` metadata for an interceptor.
pub fn bearer(token: Option<String>) -> Result<Bearer> {
    token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map(Bearer)
        .map_err(|_| Error::usage("the token must be printable ASCII"))
}

/// A channel to the coordinator at `url` (a bare HOST:PORT means http). A bad URL or TLS setting
/// is usage; a coordinator that cannot be reached is a failure.
pub async fn channel(url: &str, tls: &TlsFiles) -> Result<Channel> {
    let url = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
    let endpoint = Channel::from_shared(url.clone())
        .map_err(|e| Error::usage(format!("--coordinator {url}: {e}")))?
        .connect_timeout(Duration::from_secs(10));
    let endpoint = configure_tls(endpoint, &url, tls)?;
    endpoint
        .connect()
        .await
        .map_err(|e| Error::failure(format!("cannot reach the coordinator at {url}: {}", jobspec::chain(&e))))
}

/// Sets up TLS on `endpoint` when `url` is `https://`; plain `http://` is left alone (TLS
/// settings are then ignored, with a warning, since they may come from the environment).
fn configure_tls(endpoint: Endpoint, url: &str, tls: &TlsFiles) -> Result<Endpoint> {
    if !url.starts_with("https://") {
        if tls.ca.is_some() || tls.cert.is_some() {
            tracing::warn!("{url} is not https://: the TLS settings are not used");
        }
        return Ok(endpoint);
    }
    let ca = tls
        .ca
        .as_ref()
        .ok_or_else(|| Error::usage(format!("{url}: no CA to trust: pass --tls-ca FILE or set BERT2BERT_TLS_CA")))?;
    // A bad PEM file (the message names it) is usage.
    let ca = proto::pem::read_certs(ca).map_err(Error::Usage)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let cert = proto::pem::read_certs(cert).map_err(Error::Usage)?;
        let key = proto::pem::read_key(key).map_err(Error::Usage)?;
        config = config.identity(Identity::from_pem(cert, key));
    }
    endpoint.tls_config(config).map_err(|e| Error::usage(format!("{url}: TLS setup: {e}")))
}

/// gRPC failures: the caller's fault (bad input, unknown job, bad token) is usage.
pub fn status_error(s: Status) -> Error {
    let msg = format!("{}: {}", code_name(s.code()), s.message());
    match s.code() {
        Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::Unauthenticated | Code::PermissionDenied => {
            Error::Usage(msg)
        }
        _ => Error::Failure(msg),
    }
}

/// `NOT_FOUND` for `Code::NotFound`: the names gRPC documents.
fn code_name(c: Code) -> String {
    format!("{c:?}").chars().fold(String::new(), |mut out, ch| {
        if ch.is_uppercase() && !out.is_empty() {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_name_the_fault() {
        let e = status_error(Status::not_found("no job job-9"));
        assert!(e.is_usage());
        assert_eq!(e.to_string(), "NOT_FOUND: no job job-9");
        let e = status_error(Status::unavailable("down"));
        assert_eq!((e.exit_code(), e.to_string()), (1, "UNAVAILABLE: down".to_owned()));
        assert_eq!(status_error(Status::invalid_argument("x")).to_string(), "INVALID_ARGUMENT: x");
        assert!(bearer(Some("t\u{7}".into())).is_err());
    }
}
