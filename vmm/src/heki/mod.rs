//! The heki exit path on the VMM side: applies the verdicts of the pure
//! `heki` crate to KVM, guest memory and the event stream.
//!
//! vCPU exit → `doorbell` (guest calls), `runtime::on_unclaimed_mmio_write`
//! (trapped writes), `pins` (MSR writes, CR checks), `emulation` → `heki::judge`
//! → `enforcer::Enforcer::enforce` (record, event, pause/shutdown).
//! Device DMA: `crate::guest_access::CheckedMemory` asks the `Enforcer` (its
//! `AccessPolicy`) → `heki::judge` → `Enforcer::enforce`.

pub mod doorbell;
pub mod emulation;
mod enforcer;
mod guest_reader;
mod hook;
pub mod pin_state;
pub mod pins;
mod private_memory;
mod protection_calls;
pub mod runtime;
mod string_memo;
pub mod string_write;
pub mod translation;
pub mod translation_state;
pub mod violations;

pub use enforcer::{Enforcer, ViolationObserver};
pub use private_memory::PrivateMode;
pub use runtime::{ExitSite, HekiRuntime, HekiSettings};
#[cfg(test)]
mod pin_inheritance_tests;
#[cfg(test)]
mod tests;
