#![forbid(unsafe_code)]
//! heki: hypervisor-enforced kernel integrity, the pure policy engine.
//!
//! No KVM, no threads, no clock, no logger: the VMM feeds exits and guest
//! requests in, and applies the verdicts that come out.

pub mod policy;

pub use policy::Policy;
