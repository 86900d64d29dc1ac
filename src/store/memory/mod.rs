//! The embedded backend for revocation marks and login failure budgets: in the
//! process, for a single instance (issue 14's embedded default).
//!
//! Not selectable by configuration yet: a restart would forget the marks, and the
//! embedded default must first rebuild them from the database on start (see
//! docs/design.md, "Embedded default (in progress)").

pub mod login_failures;
pub mod marks;

pub use login_failures::MemoryBudgets;
pub use marks::MemoryMarks;
