//! Bearer-token authentication: an interceptor on each service checks
//! `authorization: Bearer <token>` against that service's token. Workers also prove who they
//! are with a per-worker secret ([`WorkerSecrets`]): the shared worker token alone only lets a
//! process register, not speak for a worker id it read in a Watch stream.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::error::{Error, Result};

/// Checks the bearer token of every request. Cheap to clone (one per connection).
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<[u8]>,
    /// Which token this is, for the error message ("client" or "worker").
    kind: &'static str,
}

impl BearerAuth {
    pub fn new(token: &str, kind: &'static str) -> Self {
        BearerAuth { token: token.as_bytes().into(), kind }
    }

    fn check(&self, req: &Request<()>) -> Result<(), Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated(format!("missing `authorization: Bearer <{} token>`", self.kind)))?;
        let given = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))?;
        if constant_time_eq(given.trim().as_bytes(), &self.token) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("wrong {} token", self.kind)))
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(&req)?;
        Ok(req)
    }
}

/// Compares without an early exit on the first differing byte, so the time taken does not
/// tell an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// Per-worker secrets: HMAC-SHA256 of the worker id under a random key. Nothing per worker is
/// stored, and a coordinator restarted on the same state directory (same key file) still knows
/// every secret it gave out, so its workers need not register again.
#[derive(Clone)]
pub struct WorkerSecrets {
    key: [u8; 32],
}

/// The key file in the state directory.
pub const KEY_FILE: &str = "worker-secret.key";

impl WorkerSecrets {
    /// A fresh key, kept in memory only (tests, and registries without a state directory).
    pub fn random() -> Result<WorkerSecrets> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| Error::Internal(format!("no randomness for the worker key: {e}")))?;
        Ok(WorkerSecrets { key })
    }

    /// The key in `dir/worker-secret.key`, made (mode 0600) with a fresh random key if missing.
    /// A file of another length is refused, naming it (never its contents).
    pub fn load_or_create(dir: &Path) -> Result<WorkerSecrets> {
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    Error::FailedPrecondition(format!(
                        "{}: not a worker key (expected 32 bytes, got {}); delete it to make a new one (workers \
                         then register again)",
                        path.display(),
                        bytes.len()
                    ))
                })?;
                Ok(WorkerSecrets { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = WorkerSecrets::random()?;
                let mut opts = std::fs::File::options();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
                f.write_all(&s.key)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| Error::io(path.display().to_string(), e))?;
                Ok(s)
            }
            Err(e) => Err(Error::io(path.display().to_string(), e)),
        }
    }

    /// The secret of `worker_id` (64 hex digits).
    pub fn secret(&self, worker_id: &str) -> String {
        hmac_sha256(&self.key, worker_id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// UNAUTHENTICATED unless `given` is `worker_id`'s secret.
    pub fn check(&self, worker_id: &str, given: &str) -> Result<()> {
        if given.is_empty() {
            return Err(Error::Unauthenticated(
                "worker_secret: missing; send the secret that Register returned with this worker id".into(),
            ));
        }
        if constant_time_eq(given.as_bytes(), self.secret(worker_id).as_bytes()) {
            Ok(())
        } else {
            Err(Error::Unauthenticated(format!("worker_secret: wrong secret for worker `{worker_id}`")))
        }
    }
}

/// HMAC (RFC 2104) over SHA-256 with a key of at most one block.
fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let pad = |b: u8| block.map(|k| k ^ b);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn with(h: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = h {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn checks_the_token() {
        let mut a = BearerAuth::new("s3cret", "client");
        assert!(a.call(with(Some("Bearer s3cret"))).is_ok());
        for bad in [None, Some("Bearer s3cre"), Some("Bearer s3cret2"), Some("s3cret"), Some("Bearer ")] {
            assert_eq!(a.call(with(bad)).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(constant_time_eq(b"", b"") && !constant_time_eq(b"a", b""));
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2 has a 4-byte key ("Jefe"); zero-padding it to 32 bytes is the
        // same HMAC key, since HMAC pads short keys with zeros to the block size.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn worker_secrets_are_bound_to_the_id_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let s = WorkerSecrets::load_or_create(dir.path()).unwrap();
        let a = s.secret("w-1-1");
        assert_eq!(a.len(), 64);
        assert_ne!(a, s.secret("w-1-2"));
        s.check("w-1-1", &a).unwrap();
        for bad in ["", a.as_str()] {
            let id = if bad.is_empty() { "w-1-1" } else { "w-1-2" };
            assert!(matches!(s.check(id, bad), Err(Error::Unauthenticated(_))), "{id} {bad}");
        }
        let again = WorkerSecrets::load_or_create(dir.path()).unwrap();
        again.check("w-1-1", &a).unwrap();
        assert_ne!(WorkerSecrets::random().unwrap().secret("w-1-1"), a);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
        }
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let e = WorkerSecrets::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(e.contains(KEY_FILE) && !e.contains("short"), "{e}");
    }
}
