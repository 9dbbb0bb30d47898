//! Bearer-token authentication: an interceptor on each service checks
//! `authorization: Bearer <token>` against that service's token.

use std::sync::Arc;

use tonic::{Request, Status};

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
}
