//! The heki exit path on the VMM side: applies the verdicts of the pure
//! `heki` crate to KVM, guest memory and the event stream.
//!
//! vCPU exit → `doorbell` (guest calls) or `runtime::on_guest_write`
//! (trapped writes) → `heki` verdict → memory / registers / memslots + event.

pub mod api;
pub mod doorbell;
pub mod emulation;
pub mod memslots;
pub mod pins;
pub mod runtime;
pub mod violations;

pub use runtime::{HekiAction, HekiRuntime};
