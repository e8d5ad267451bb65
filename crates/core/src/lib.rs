//! Coffer's domain: names and limits, secret metadata, the envelope-encryption scheme and the
//! authorization decision.
//!
//! Architecture invariant: this crate does no I/O. It never touches the network, the file system
//! or the clock (callers pass `now`), so everything here is deterministic and unit-testable.

pub mod authz;
pub mod crypto;
pub mod identity;
pub mod model;
pub mod names;
