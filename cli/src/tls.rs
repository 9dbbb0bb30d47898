//! Client-side TLS for the coordinator's clients (`submit`, `status`, `list`, `cancel`, `watch`
//! and `worker`): an `https://` coordinator URL turns it on; the CA to trust is a PEM file, and a
//! client certificate and key can be given for a coordinator that requires mutual TLS.

use std::path::PathBuf;

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

impl TlsArgs {
    /// The files, for [`agent::client::channel`] (which reads and checks them).
    pub fn files(&self) -> agent::TlsFiles {
        agent::TlsFiles { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone() }
    }
}
