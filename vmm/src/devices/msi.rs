//! MSI routes: each MSI-X vector gets a GSI routed by KVM to its message,
//! and an irqfd that raises it without a VMM exit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// GSIs below this belong to the PIC/IOAPIC.
const FIRST_MSI_GSI: u32 = 24;

pub struct MsiRoutes {
    vm: Arc<hypervisor::Vm>,
    routes: Mutex<BTreeMap<u32, (u64, u32)>>,
    next_gsi: AtomicU32,
    /// GSIs of removed devices, handed out again before new ones.
    free: Mutex<Vec<u32>>,
}

impl MsiRoutes {
    pub fn new(vm: Arc<hypervisor::Vm>) -> Self {
        MsiRoutes { vm, routes: Mutex::default(), next_gsi: AtomicU32::new(FIRST_MSI_GSI), free: Mutex::default() }
    }

    pub fn allocate(&self) -> u32 {
        if let Some(gsi) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return gsi;
        }
        self.next_gsi.fetch_add(1, Ordering::Relaxed)
    }

    /// Gives back a GSI whose route and irqfd are gone.
    pub fn release(&self, gsi: u32) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(gsi);
    }

    pub fn vm(&self) -> &hypervisor::Vm {
        &self.vm
    }

    /// Routes `gsi` to an MSI message, or removes the route (`None`: masked or disabled).
    pub fn set(&self, gsi: u32, message: Option<(u64, u32)>) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match message {
            Some(m) => routes.insert(gsi, m) != Some(m),
            None => routes.remove(&gsi).is_some(),
        };
        if changed {
            let all: Vec<(u32, u64, u32)> = routes.iter().map(|(g, (a, d))| (*g, *a, *d)).collect();
            if let Err(e) = self.vm.set_msi_routes(&all) {
                crate::rate_limited!(warn, "cannot update MSI routes: {e}");
            }
        }
    }
}
