//! The heki exit path on the VMM side: applies the verdicts of the pure
//! `heki` crate to KVM, guest memory and the event stream.

pub mod api;
#[allow(dead_code)] // wired in by the heki exit path
pub mod memslots;
#[allow(dead_code)]
pub mod violations;
