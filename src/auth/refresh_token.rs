//! Opaque refresh tokens: 256 bits from the OS CSPRNG, base64url, stored as SHA-256.
//!
//! The reuse grace window must hand the *same* successor to a concurrent caller or a
//! retry, yet the database may hold no usable token. So the successor is sealed
//! (AES-256-GCM) under a key derived from the token it replaces: only someone presenting
//! that token can open it, and a database dump alone opens nothing.
//!
//! A session keeps only the rows of its current token, the previous one and those
//! rotated within the grace window, so storage does not grow with refreshes. A token
//! older than that must still be recognised as reuse (theft), so each token of a chain
//! carries, besides its 256 random bits, the session id, its generation (0 at login,
//! +1 per rotation) and the chain's secret (16 random bytes shared by the chain, of
//! which the session stores only a SHA-256): a presented token whose row is gone,
//! whose chain secret matches and whose generation is below the session's current one is
//! an old token of that chain. The chain secret only proves the token was once issued
//! for that session (so that knowing a session id, as downstream APIs do, is not enough
//! to end it); the right to refresh rests on the random part, checked by hash.
//! Layout (base64url, 96 characters): session id (16) ‖ generation (8, big-endian) ‖
//! chain secret (16) ‖ random (32). Tokens of the earlier 43-character format (random
//! only) still refresh; their successors keep that format.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::domain::SessionId;

const TOKEN_BYTES: usize = 32;
/// base64url of 32 bytes without padding: a plain token (device tokens, and refresh
/// tokens of the first format).
const TOKEN_CHARS: usize = 43;
/// Session id, generation, chain secret, random.
const CHAIN_BYTES: usize = 16 + 8 + 16 + TOKEN_BYTES;
const CHAIN_CHARS: usize = 96;

/// What a chain token says about its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub session: SessionId,
    pub generation: u64,
    secret: [u8; 16],
}

impl Chain {
    /// What the session stores to recognise tokens of this chain.
    pub fn secret_hash(&self) -> [u8; 32] {
        super::sha256(&self.secret)
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut raw = [0u8; N];
    SystemRandom::new()
        .fill(&mut raw)
        .expect("the OS random generator failed");
    raw
}

/// A refresh token in plain text; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken(String);

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken([redacted])")
    }
}

impl RefreshToken {
    /// A plain token: 256 random bits and nothing else.
    pub fn generate() -> Self {
        RefreshToken(URL_SAFE_NO_PAD.encode(random::<TOKEN_BYTES>()))
    }

    /// The first token of a new session's chain (generation 0).
    pub fn start_chain(session: SessionId) -> Self {
        Self::chain_token(session, 0, random::<16>())
    }

    /// [`RefreshToken::start_chain`], with what the session stores of the chain secret.
    pub fn start_chain_hashed(session: SessionId) -> (Self, [u8; 32]) {
        let token = Self::start_chain(session);
        let hash = token
            .chain()
            .map(|c| c.secret_hash())
            .expect("a new chain token has a chain");
        (token, hash)
    }

    fn chain_token(session: SessionId, generation: u64, secret: [u8; 16]) -> Self {
        let mut raw = Vec::with_capacity(CHAIN_BYTES);
        raw.extend_from_slice(session.0.as_bytes());
        raw.extend_from_slice(&generation.to_be_bytes());
        raw.extend_from_slice(&secret);
        raw.extend_from_slice(&random::<TOKEN_BYTES>());
        RefreshToken(URL_SAFE_NO_PAD.encode(raw))
    }

    /// The token that replaces this one: the next generation of the same chain (a
    /// plain token is followed by a plain one).
    pub fn successor(&self) -> Self {
        match self.chain() {
            Some(c) => Self::chain_token(c.session, c.generation + 1, c.secret),
            None => Self::generate(),
        }
    }

    /// The chain this token belongs to, for chain tokens.
    pub fn chain(&self) -> Option<Chain> {
        if self.0.len() != CHAIN_CHARS {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(&self.0).ok()?;
        let session = uuid::Uuid::from_slice(&raw[..16]).ok()?;
        let generation = u64::from_be_bytes(raw[16..24].try_into().ok()?);
        let secret = raw[24..40].try_into().ok()?;
        Some(Chain {
            session: SessionId(session),
            generation,
            secret,
        })
    }

    /// Accepts only strings that could have been issued, so junk never reaches the store.
    pub fn parse(s: &str) -> Option<Self> {
        let expected = match s.len() {
            TOKEN_CHARS => TOKEN_BYTES,
            CHAIN_CHARS => CHAIN_BYTES,
            _ => return None,
        };
        let ok = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && URL_SAFE_NO_PAD
                .decode(s)
                .is_ok_and(|raw| raw.len() == expected);
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
    fn chain_tokens_carry_session_generation_and_chain_and_follow_on() {
        let sid = SessionId(uuid::Uuid::new_v4());
        let first = RefreshToken::start_chain(sid);
        assert_eq!(first.expose().len(), 96);
        assert_eq!(RefreshToken::parse(first.expose()), Some(first.clone()));
        let c = first.chain().unwrap();
        assert_eq!((c.session, c.generation), (sid, 0));
        let next = first.successor();
        let n = next.chain().unwrap();
        assert_eq!((n.session, n.generation), (sid, 1));
        assert_eq!(n.secret_hash(), c.secret_hash(), "same chain");
        assert_ne!(next, first);
        assert_ne!(next.hash(), first.hash());
        let other = RefreshToken::start_chain(sid).chain().unwrap();
        assert_ne!(other.secret_hash(), c.secret_hash(), "chains differ");
        // Plain tokens have no chain, and are followed by plain ones.
        let plain = RefreshToken::generate();
        assert!(plain.chain().is_none());
        assert_eq!(plain.successor().expose().len(), 43);
        assert!(RefreshToken::parse(&"a".repeat(95)).is_none());
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
