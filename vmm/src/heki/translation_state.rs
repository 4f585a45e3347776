//! The VM's translation locks (LOCK_MAPPINGS) and what the checks last
//! reported; `translation.rs` takes and checks the locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use heki::translation::{TranslationLocks, expect};

/// The VM's translation locks and what the checks reported.
pub struct TranslationState {
    pub(super) locks: RwLock<TranslationLocks>,
    /// Set once a range is locked: from then on every register check walks.
    pub(super) active: AtomicBool,
    /// Per vCPU id, under `log`: the last (CR3, VA) reported, so a standing
    /// remap is reported once per vCPU.
    pub(super) last_logged: Mutex<HashMap<u8, (u64, u64)>>,
    /// Per vCPU id: (CR3, how many times in a row its translation was put back).
    pub(super) restores: Mutex<HashMap<u8, (u64, u32)>>,
    /// Per vCPU id: the CR3 last found intact and when (ns since `clock`).
    /// A busy guest exits thousands of times a second; the same CR3 found
    /// intact less than `RECHECK` ago is not read again.
    pub(super) seen_cr3: [AtomicU64; 256],
    pub(super) seen_at: [AtomicU64; 256],
    pub(super) clock: Instant,
}

/// How long a CR3 found intact is trusted at exits. The tick
/// (`cr_check_interval_ms`, 10 ms by default) is longer, so every tick
/// checks again: the detection window grows by at most this much.
pub(super) const RECHECK: Duration = Duration::from_millis(1);

/// A CR3 whose translation had to be put back this many times in a row is
/// a guest fighting the restore (it rewrites its entry each time): under
/// `deny` the VM is paused, as the remapped code must not keep running.
pub(super) const RESTORES_BEFORE_PAUSE: u32 = 3;

impl Default for TranslationState {
    fn default() -> Self {
        TranslationState {
            locks: RwLock::default(),
            active: AtomicBool::new(false),
            last_logged: Mutex::default(),
            restores: Mutex::default(),
            seen_cr3: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            seen_at: std::array::from_fn(|_| AtomicU64::new(0)),
            clock: Instant::now(),
        }
    }
}

impl TranslationState {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The locked ranges and top-level entries, for `vm.heki`.
    pub fn to_json(&self) -> serde_json::Value {
        let locks = self.locks.read().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "ranges": locks.ranges().iter().map(|r| serde_json::json!({
                "va": format!("{:#x}", r.va),
                "len": r.len,
                "read_only": r.expect & expect::READ_ONLY != 0,
                "no_exec": r.expect & expect::NO_EXEC != 0,
                "mappings": r.map.mappings.len(),
            })).collect::<Vec<_>>(),
            "top_level_entries": locks.top_entries().iter()
                .map(|t| serde_json::json!({"index": t.index, "value": format!("{:#x}", t.value)}))
                .collect::<Vec<_>>(),
        })
    }
}
