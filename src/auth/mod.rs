//! The domain: passwords, access and refresh tokens, signing keys, sessions, throttling.

pub mod access_token;
pub mod keys;
pub mod password;
pub mod refresh_token;
pub mod session;
pub mod throttle;
