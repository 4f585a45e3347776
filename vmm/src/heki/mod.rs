//! The heki exit path on the VMM side: applies the verdicts of the pure
//! `heki` crate to KVM, guest memory and the event stream.
//!
//! vCPU exit → `doorbell` (guest calls), `runtime::on_unclaimed_mmio_write`
//! (trapped writes), `pins` (MSR writes, CR checks), `emulation` → `heki::judge`
//! → `checked_memory::Enforcer::enforce` (record, event, pause/shutdown).
//! Device DMA: `checked_memory::CheckedMemory` → `heki::judge` → `Enforcer`.

pub mod api;
pub mod checked_memory;
pub mod doorbell;
pub mod emulation;
mod hook;
pub mod pins;
pub mod runtime;
pub mod string_write;
pub mod testing;
pub mod translation;
pub mod violations;

pub use checked_memory::{Accessor, CheckedMemory, Enforcer};
pub use runtime::{ExitSite, HekiRuntime};
#[cfg(test)]
mod tests;
