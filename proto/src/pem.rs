//! PEM files for the protocol's TLS, read and checked where they are named: the coordinator's
//! server certificate and key, and a client's CA, certificate and key. Both sides use these, so a
//! bad file is an error naming that file on either side rather than a failed handshake later.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file of one or more certificates, checked; the error names the file.
pub fn read_certs(path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(path)?;
    check_certs(path, &pem)?;
    Ok(pem)
}

/// A PEM private key file, checked; the error names the file.
pub fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?;
    Ok(pem)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// At least one certificate, and every PEM certificate block well-formed.
fn check_certs(path: &Path, pem: &[u8]) -> Result<(), String> {
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("{}: no PEM certificate (expected a -----BEGIN CERTIFICATE----- block)", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("proto-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("not-a-cert.pem");
        std::fs::write(&f, "hello\n").unwrap();
        let e = read_certs(&f).unwrap_err();
        assert!(e.contains("not-a-cert.pem") && e.contains("no PEM certificate"), "{e}");
        let e = read_key(&f).unwrap_err();
        assert!(e.contains("not-a-cert.pem") && e.contains("not a PEM private key"), "{e}");
        let missing = read_certs(&dir.join("missing.pem")).unwrap_err();
        assert!(missing.contains("missing.pem"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
