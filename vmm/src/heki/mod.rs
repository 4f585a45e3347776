//! The heki exit path on the VMM side: applies the verdicts of the pure
//! `heki` crate to KVM, guest memory and the event stream.

pub mod api;
pub mod memslots;
