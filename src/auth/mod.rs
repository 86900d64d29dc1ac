//! The domain: passwords, access and refresh tokens, signing keys, sessions, throttling,
//! the account and admin operations built on them, and the periodic cleanup.

pub mod access_token;
pub mod account;
pub mod admin;
pub mod attempt;
pub mod cleanup;
pub mod device;
pub mod keys;
pub mod password;
pub mod recent;
pub mod refresh_token;
pub mod session;
pub mod throttle;

/// SHA-256 of `bytes`, as a fixed-size key (remembered tokens, key fingerprints).
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}
