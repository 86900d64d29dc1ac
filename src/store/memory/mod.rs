//! The embedded backend for revocation marks and login failure budgets: in the
//! process, for a single instance (`redis.url = ""`). The marks are made durable
//! through the database (see [`marks`]); the failure budgets are not (a restart
//! forgets failures, as a Redis restart would). Only one instance may run this way on
//! a database ([`crate::store::Store::claim_single_instance`]).

pub mod login_failures;
pub mod marks;

pub use login_failures::MemoryBudgets;
pub use marks::MemoryMarks;
