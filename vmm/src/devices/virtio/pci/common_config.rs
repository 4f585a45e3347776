//! virtio_pci_common_cfg: feature negotiation, queue setup and the
//! device_status state machine, as the vCPUs see them. Queue work is the
//! workers' (`data_path.rs`): these registers hand the queues over at
//! DRIVER_OK and take them back at reset.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use virtio_queue::{Queue, QueueT};

use super::data_path::DataPath;
use super::msix::NO_VECTOR;
use crate::devices::pci::fill;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, status};

/// Register offsets in virtio_pci_common_cfg.
mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

pub struct CommonConfig {
    /// device_status without NEEDS_RESET, which the data path holds.
    status: u8,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    /// The queues as the driver sets them up; the workers get copies at DRIVER_OK.
    queues: Vec<Queue>,
    config_vector: u16,
    config_generation: u8,
}

impl CommonConfig {
    /// `device_features`: the device's own bits (VIRTIO_F_VERSION_1 is added).
    pub fn new(device_features: u64, num_queues: usize, queue_max_size: u16) -> std::io::Result<Self> {
        let queues = (0..num_queues)
            .map(|_| Queue::new(queue_max_size).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CommonConfig {
            status: 0,
            device_features: VIRTIO_F_VERSION_1 | device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            config_vector: NO_VECTOR,
            config_generation: 0,
        })
    }

    pub fn status(&self, data: &DataPath) -> u8 {
        self.status | if data.needs_reset() { status::NEEDS_RESET } else { 0 }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    pub fn read(&self, data: &DataPath, offset: u64, out: &mut [u8]) {
        let half = |value: u64, select: u32| match select {
            0 => value & 0xffff_ffff,
            1 => value >> 32,
            _ => 0,
        };
        let queue = |get: fn(&Queue) -> u64| self.selected().map_or(0, get);
        let value: u64 = match offset {
            reg::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            reg::DEVICE_FEATURE => half(self.device_features, self.device_feature_select),
            reg::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            reg::DRIVER_FEATURE => half(self.driver_features, self.driver_feature_select),
            reg::CONFIG_MSIX_VECTOR => u64::from(self.config_vector),
            reg::NUM_QUEUES => self.queues.len() as u64,
            reg::DEVICE_STATUS => u64::from(self.status(data)),
            reg::CONFIG_GENERATION => u64::from(self.config_generation),
            reg::QUEUE_SELECT | reg::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
            reg::QUEUE_SIZE => queue(|q| u64::from(q.size())),
            reg::QUEUE_MSIX_VECTOR => match self.selected() {
                Some(_) => u64::from(data.queue_vector(usize::from(self.queue_select))),
                None => u64::from(NO_VECTOR),
            },
            reg::QUEUE_ENABLE => queue(|q| u64::from(q.ready())),
            reg::QUEUE_DESC_LO => queue(|q| q.desc_table()),
            reg::QUEUE_DESC_HI => queue(|q| q.desc_table() >> 32),
            reg::QUEUE_DRIVER_LO => queue(|q| q.avail_ring()),
            reg::QUEUE_DRIVER_HI => queue(|q| q.avail_ring() >> 32),
            reg::QUEUE_DEVICE_LO => queue(|q| q.used_ring()),
            reg::QUEUE_DEVICE_HI => queue(|q| q.used_ring() >> 32),
            _ => 0,
        };
        fill(&value.to_le_bytes(), 0, out);
    }

    pub fn write(&mut self, data: &DataPath, offset: u64, bytes: &[u8]) {
        let mut raw = [0u8; 8];
        let n = bytes.len().min(8);
        raw[..n].copy_from_slice(&bytes[..n]);
        let v = u64::from_le_bytes(raw);
        match offset {
            reg::QUEUE_MSIX_VECTOR => data.set_queue_vector(usize::from(self.queue_select), v as u16),
            reg::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            reg::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            reg::DRIVER_FEATURE if self.status & status::FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            reg::CONFIG_MSIX_VECTOR => self.config_vector = data.msix.vector_or_none(v as u16),
            reg::DEVICE_STATUS => self.write_status(data, v as u8),
            reg::QUEUE_SELECT => self.queue_select = v as u16,
            reg::QUEUE_SIZE..=reg::QUEUE_DEVICE_HI => self.write_queue(offset, v),
            _ => {}
        }
    }

    /// Queue registers: only before DRIVER_OK, and only for an existing queue.
    fn write_queue(&mut self, offset: u64, v: u64) {
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(usize::from(self.queue_select)) else { return };
        match offset {
            reg::QUEUE_SIZE => queue.set_size(v as u16),
            reg::QUEUE_ENABLE if v == 1 => queue.set_ready(true),
            reg::QUEUE_DESC_LO => queue.set_desc_table_address(Some(v as u32), None),
            reg::QUEUE_DESC_HI => queue.set_desc_table_address(None, Some(v as u32)),
            reg::QUEUE_DRIVER_LO => queue.set_avail_ring_address(Some(v as u32), None),
            reg::QUEUE_DRIVER_HI => queue.set_avail_ring_address(None, Some(v as u32)),
            reg::QUEUE_DEVICE_LO => queue.set_used_ring_address(Some(v as u32), None),
            reg::QUEUE_DEVICE_HI => queue.set_used_ring_address(None, Some(v as u32)),
            _ => {}
        }
    }

    /// The device_status state machine, including reset and the checks at DRIVER_OK.
    fn write_status(&mut self, data: &DataPath, value: u8) {
        if value == 0 {
            self.reset(data);
            return;
        }
        let mut value = value & !status::NEEDS_RESET;
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device_features;
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                value &= !status::FEATURES_OK;
            }
        }
        if value & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            // Rings first: a ring in protected memory is reported, not just invalid.
            let bad =
                self.queues.iter().any(|q| q.ready() && (!rings_allowed(data, q) || !q.is_valid(&data.memory.mem)));
            if bad || !data.activate(&self.queues, self.driver_features) {
                data.set_needs_reset();
            }
        }
        data.set_driver_ok(value & status::DRIVER_OK != 0);
        self.status = value;
    }

    fn reset(&mut self, data: &DataPath) {
        data.reset(self.status & status::DRIVER_OK != 0);
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.config_vector = NO_VECTOR;
    }
}

/// A ring the device must write (used ring) or trusts (descriptors,
/// available ring) may not sit in protected memory when the driver starts
/// the device. Later locks are caught at each used-ring write.
fn rings_allowed(data: &DataPath, queue: &Queue) -> bool {
    let size = u64::from(queue.size());
    let rings = [
        (queue.desc_table(), size.saturating_mul(16), "descriptor table"),
        (queue.avail_ring(), size.saturating_mul(2).saturating_add(6), "available ring"),
        (queue.used_ring(), size.saturating_mul(8).saturating_add(6), "used ring"),
    ];
    rings.iter().all(|&(gpa, len, what)| {
        let ok = data.memory.mem.probe_write(gpa, len);
        if !ok {
            crate::rate_limited!(
                warn,
                "{}: {what} at {gpa:#x} is in protected memory; device needs reset",
                data.memory.device()
            );
        }
        ok
    })
}
