//! Tessera: a token authentication server. Login issues short-lived JWT access tokens
//! and rotating opaque refresh tokens; logout and revocation take effect at once on
//! every instance through a Redis denylist. See `README.md` and `docs/`.

pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod email;
pub mod error;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod seal;
pub mod startup;
pub mod store;
pub mod telemetry;
