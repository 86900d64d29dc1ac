//! The domain: passwords, access and refresh tokens, signing keys, sessions, throttling,
//! the account and admin operations built on them, and the periodic cleanup.

pub mod access_token;
pub mod account;
pub mod admin;
pub mod anonymous;
pub mod attempt;
pub mod cleanup;
pub mod csrf;
pub mod device;
pub mod email_link;
pub mod keys;
pub mod mfa;
pub mod notice;
pub mod password;
pub mod recent;
pub mod refresh_token;
pub mod session;
pub mod step_up;
pub mod throttle;
pub mod user_migrations;

pub(crate) use crate::domain::sha256;
