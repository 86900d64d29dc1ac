//! The shared backend for revocation marks and login failure budgets: Redis, read and
//! written by every instance.

pub mod denylist;
pub mod login_failures;
pub mod measured;

pub use denylist::Denylist;
pub use login_failures::LoginFailures;
