//! CSRF tokens of browser sessions (cookie delivery).
//!
//! A session's CSRF token is an HMAC-SHA256 of its id under a server-side secret
//! (`keys.dir/csrf.secret`), so it is bound to that session: a token of one session
//! never passes for another, nothing needs storing, and every instance sharing the
//! key directory computes the same. A session id is no secret (it is in access tokens
//! and `GET /sessions`), the HMAC is: a script on another site can neither read the
//! token (the cookie holding it is `SameSite=Strict` and same-site only) nor compute it.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use crate::domain::SessionId;

/// What the HMAC covers besides the session id, so that the secret can never produce
/// a value that means something elsewhere.
const PURPOSE: &[u8] = b"tessera csrf v1\0";

pub struct CsrfKey(hmac::Key);

impl CsrfKey {
    pub fn new(secret: &[u8]) -> Self {
        CsrfKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The session's CSRF token (base64url, 43 characters).
    pub fn token(&self, session: SessionId) -> String {
        URL_SAFE_NO_PAD.encode(self.tag(session))
    }

    /// Whether `presented` is the session's CSRF token (constant-time comparison).
    pub fn verify(&self, session: SessionId, presented: &str) -> bool {
        let Ok(presented) = URL_SAFE_NO_PAD.decode(presented.trim()) else {
            return false;
        };
        bool::from(self.tag(session).as_slice().ct_eq(&presented))
    }

    fn tag(&self, session: SessionId) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(PURPOSE);
        ctx.update(session.0.as_bytes());
        ctx.sign().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_passes_for_its_session_only_and_under_its_secret_only() {
        let key = CsrfKey::new(&[7u8; 32]);
        let (a, b) = (
            SessionId(uuid::Uuid::new_v4()),
            SessionId(uuid::Uuid::new_v4()),
        );
        let token = key.token(a);
        assert_eq!(token.len(), 43);
        assert!(key.verify(a, &token));
        assert!(!key.verify(b, &token));
        assert!(!CsrfKey::new(&[8u8; 32]).verify(a, &token));
        for junk in ["", "x", "!!!", &token[..42]] {
            assert!(!key.verify(a, junk), "{junk:?}");
        }
    }
}
