//! Client-side TLS for the coordinator's clients (`submit`, `status`, `list`, `cancel`, `watch`
//! and `worker`): an `https://` coordinator URL turns it on; the CA to trust is a PEM file, and a
//! client certificate and key can be given for a coordinator that requires mutual TLS.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::{CliError, CliResult};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// The CA certificate (PEM) an https:// coordinator's certificate must chain to.
    #[arg(long, env = "BERT2BERT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a coordinator that requires mutual TLS; needs --tls-key.
    #[arg(long, env = "BERT2BERT_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "BERT2BERT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

fn usage(e: coordinator::Error) -> CliError {
    CliError::usage(e.to_string())
}

/// Sets up TLS on `endpoint` when `url` is `https://`; plain `http://` is left alone (TLS
/// settings are then ignored, with a warning, since they may come from the environment).
pub(crate) fn configure(endpoint: Endpoint, url: &str, tls: &TlsArgs) -> CliResult<Endpoint> {
    if !url.starts_with("https://") {
        if tls.tls_ca.is_some() || tls.tls_cert.is_some() {
            tracing::warn!("{url} is not https://: the TLS settings are not used");
        }
        return Ok(endpoint);
    }
    let ca = tls
        .tls_ca
        .as_ref()
        .ok_or_else(|| CliError::usage(format!("{url}: no CA to trust: pass --tls-ca FILE or set BERT2BERT_TLS_CA")))?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(coordinator::tls::read_pem_certs(ca).map_err(usage)?));
    if let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) {
        let cert = coordinator::tls::read_pem_certs(cert).map_err(usage)?;
        let key = coordinator::tls::read_pem_key(key).map_err(usage)?;
        config = config.identity(Identity::from_pem(cert, key));
    }
    endpoint.tls_config(config).map_err(|e| CliError::usage(format!("{url}: TLS setup: {e}")))
}
