//! TLS for the gRPC server: a certificate chain and key (PEM), and optionally the CA that client
//! certificates must chain to (mutual TLS). Everything is checked when the coordinator starts, so
//! a bad file is an error naming that file rather than a failure on the first connection.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// PEM material read from files, with the files' names for error messages.
#[derive(Clone)]
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca: Option<(PathBuf, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_ca", &self.client_ca.as_ref().map(|(p, _)| p))
            .finish()
    }
}

/// A PEM file of one or more certificates, checked; the error names the file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<u8>> {
    proto::pem::read_certs(path).map_err(Error::InvalidArgument)
}

/// A PEM private key file, checked; the error names the file.
pub fn read_pem_key(path: &Path) -> Result<Vec<u8>> {
    proto::pem::read_key(path).map_err(Error::InvalidArgument)
}

impl Tls {
    /// Reads and checks the files: `cert` (the server's certificate chain), `key` (its private
    /// key), and `client_ca` (when set, clients must present a certificate issued by it).
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Tls> {
        let cert_pem = read_pem_certs(cert)?;
        let key_pem = read_pem_key(key)?;
        let client_ca = match client_ca {
            Some(p) => Some((p.to_owned(), read_pem_certs(p)?)),
            None => None,
        };
        let tls = Tls { cert_file: cert.to_owned(), key_file: key.to_owned(), cert_pem, key_pem, client_ca };
        tls.check()?;
        Ok(tls)
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca {
            Some((_, pem)) => config.client_ca_root(Certificate::from_pem(pem)),
            None => config,
        }
    }

    /// Builds the server's TLS setup once, so that a key that does not fit its certificate is
    /// caught before serving.
    pub(crate) fn check(&self) -> Result<()> {
        match tonic::transport::Server::builder().tls_config(self.server_config()) {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::InvalidArgument(format!(
                "{} with {}: {}",
                self.cert_file.display(),
                self.key_file.display(),
                jobspec::chain(&e)
            ))),
        }
    }
}
