//! Opaque refresh tokens: 256 bits from the OS CSPRNG, base64url, stored as SHA-256.
//!
//! The reuse grace window must hand the *same* successor to a concurrent caller or a
//! retry, yet the database may hold no usable token. So the successor is sealed
//! (AES-256-GCM) under a key derived from the token it replaces: only someone presenting
//! that token can open it, and a database dump alone opens nothing.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const TOKEN_BYTES: usize = 32;
/// base64url of 32 bytes without padding.
const TOKEN_CHARS: usize = 43;

/// A refresh token in plain text; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken(String);

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken([redacted])")
    }
}

impl RefreshToken {
    pub fn generate() -> Self {
        let mut raw = [0u8; TOKEN_BYTES];
        SystemRandom::new()
            .fill(&mut raw)
            .expect("the OS random generator failed");
        RefreshToken(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Accepts only strings that could have been issued, so junk never reaches the store.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = s.len() == TOKEN_CHARS
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && URL_SAFE_NO_PAD
                .decode(s)
                .is_ok_and(|raw| raw.len() == TOKEN_BYTES);
        ok.then(|| RefreshToken(s.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps.
    pub fn hash(&self) -> Vec<u8> {
        digest(&SHA256, self.0.as_bytes()).as_ref().to_vec()
    }

    fn sealing_key(&self) -> LessSafeKey {
        let mut input = b"tessera/successor/v1\0".to_vec();
        input.extend_from_slice(self.0.as_bytes());
        let key = digest(&SHA256, &input);
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_ref()).expect("32-byte key"))
    }

    /// Seals `successor` so that only a holder of `self` can open it.
    pub fn seal_successor(&self, successor: &RefreshToken) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the OS random generator failed");
        let mut buf = successor.0.as_bytes().to_vec();
        self.sealing_key()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .expect("AES-GCM sealing cannot fail for small inputs");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// Opens what [`seal_successor`](Self::seal_successor) made with this token.
    pub fn open_successor(&self, sealed: &[u8]) -> Option<RefreshToken> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .sealing_key()
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .ok()?;
        RefreshToken::parse(std::str::from_utf8(plain).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_base64url_and_unique() {
        let a = RefreshToken::generate();
        let b = RefreshToken::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 43);
        assert_eq!(RefreshToken::parse(a.expose()), Some(a.clone()));
        assert_eq!(a.hash().len(), 32);
        assert_ne!(a.hash(), b.hash());
        for junk in [
            "",
            "short",
            &"a".repeat(44),
            &format!("{}=", &a.expose()[..42]),
            "ä".repeat(43).as_str(),
        ] {
            assert!(RefreshToken::parse(junk).is_none(), "{junk:?}");
        }
        assert_eq!(format!("{a:?}"), "RefreshToken([redacted])");
    }

    #[test]
    fn only_the_parent_token_opens_its_successor() {
        let parent = RefreshToken::generate();
        let child = RefreshToken::generate();
        let sealed = parent.seal_successor(&child);
        assert!(
            !sealed
                .windows(10)
                .any(|w| child.expose().as_bytes().windows(10).any(|c| c == w))
        );
        assert_eq!(parent.open_successor(&sealed), Some(child));
        assert_eq!(RefreshToken::generate().open_successor(&sealed), None);
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert_eq!(parent.open_successor(&tampered), None);
    }
}
