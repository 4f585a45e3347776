/* A minimal polling virtio-pci (modern) driver for test guests: one queue,
 * no interrupts. Include from a scenario. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

#define VIRTQ_SIZE 8
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct virtq_avail { u16 flags; u16 idx; u16 ring[VIRTQ_SIZE]; u16 used_event; };
struct virtq_used_elem { u32 id; u32 len; };
struct virtq_used { u16 flags; u16 idx; struct virtq_used_elem ring[VIRTQ_SIZE]; u16 avail_event; };

/* The queue lives in one page: descriptors, then available, then used ring. */
struct virtq_page {
    struct virtq_desc desc[VIRTQ_SIZE];
    struct virtq_avail avail;
    u8 pad[512 - sizeof(struct virtq_avail) - VIRTQ_SIZE * sizeof(struct virtq_desc)];
    struct virtq_used used;
};

struct virtio_dev {
    volatile u8 *common, *notify, *device;
    struct virtq_page *q;
    u16 avail_idx, used_seen;
    u16 qindex; /* the one queue this driver uses */
    u32 slot;   /* PCI slot */
    u64 bar;
};

static inline u32 pci_read32(u32 slot, u32 reg) {
    outl(0xcf8, 0x80000000u | (slot << 11) | (reg & 0xfc));
    return inl(0xcfc);
}

/* Finds the virtio device with this PCI device id; 0 on success. */
static __attribute__((unused)) int virtio_find(u16 device_id, struct virtio_dev *d, struct virtq_page *queue) {
    for (u32 slot = 0; slot < 32; slot++) {
        u32 id = pci_read32(slot, 0);
        if ((id & 0xffff) != 0x1af4 || (id >> 16) != device_id) continue;
        u64 bar = (pci_read32(slot, 0x10) & ~0xfUL) | ((u64)pci_read32(slot, 0x14) << 32);
        u32 cap = pci_read32(slot, 0x34) & 0xff;
        while (cap) {
            u32 head = pci_read32(slot, cap);
            u32 type = (head >> 24) & 0xff, offset = pci_read32(slot, cap + 8);
            if ((head & 0xff) == 0x09) {
                if (type == 1) d->common = (volatile u8 *)(bar + offset);
                if (type == 2) d->notify = (volatile u8 *)(bar + offset);
                if (type == 4) d->device = (volatile u8 *)(bar + offset);
            }
            cap = (head >> 8) & 0xff;
        }
        d->q = queue;
        d->slot = slot;
        d->bar = bar;
        d->avail_idx = d->used_seen = 0;
        return d->common && d->notify ? 0 : -1;
    }
    return -1;
}

#define COMMON8(d, off) (*(volatile u8 *)((d)->common + (off)))
#define COMMON16(d, off) (*(volatile u16 *)((d)->common + (off)))
#define COMMON32(d, off) (*(volatile u32 *)((d)->common + (off)))

static inline void pci_write16(u32 slot, u32 reg, u16 value) {
    outl(0xcf8, 0x80000000u | (slot << 11) | (reg & 0xfc));
    __asm__ volatile("outw %0, %1" ::"a"(value), "Nd"((u16)(0xcfc + (reg & 2))));
}

/* Programs MSI-X vector `entry` to deliver `vector` to CPU 0 and enables MSI-X. 0 on success. */
static __attribute__((unused)) int virtio_msix(struct virtio_dev *d, u32 entry, u8 vector) {
    u32 cap = pci_read32(d->slot, 0x34) & 0xff;
    while (cap) {
        u32 head = pci_read32(d->slot, cap);
        if ((head & 0xff) == 0x11) {
            u32 table = pci_read32(d->slot, cap + 4);
            volatile u32 *e = (volatile u32 *)(d->bar + (table & ~7u) + 16 * entry);
            e[0] = 0xfee00000; e[1] = 0; e[2] = vector; e[3] = 0;
            pci_write16(d->slot, cap + 2, (u16)(((head >> 16) & 0x7ff) | 0x8000));
            return 0;
        }
        cap = (head >> 8) & 0xff;
    }
    return -1;
}

/* Resets the device and negotiates VERSION_1: true if FEATURES_OK stuck. */
static __attribute__((unused)) int virtio_negotiate(struct virtio_dev *d) {
    COMMON8(d, 0x14) = 0;
    COMMON8(d, 0x14) = 1 | 2;
    COMMON32(d, 0x08) = 1;
    COMMON32(d, 0x0c) = 1; /* VIRTIO_F_VERSION_1 (bit 32) */
    COMMON32(d, 0x08) = 0;
    COMMON32(d, 0x0c) = 0;
    COMMON8(d, 0x14) = 1 | 2 | 8;
    return (COMMON8(d, 0x14) & 8) != 0;
}

/* Points queue d->qindex at its rings, enables it with `vector` and sets
 * DRIVER_OK. Returns the status read back. */
static __attribute__((unused)) u8 virtio_enable_queue(struct virtio_dev *d, u16 size, u64 desc, u64 avail, u64 used,
                                                      u16 vector) {
    COMMON16(d, 0x16) = d->qindex;
    COMMON16(d, 0x18) = size;
    COMMON32(d, 0x20) = (u32)desc; COMMON32(d, 0x24) = (u32)(desc >> 32);
    COMMON32(d, 0x28) = (u32)avail; COMMON32(d, 0x2c) = (u32)(avail >> 32);
    COMMON32(d, 0x30) = (u32)used; COMMON32(d, 0x34) = (u32)(used >> 32);
    COMMON16(d, 0x1a) = vector;
    COMMON16(d, 0x1c) = 1;
    COMMON8(d, 0x14) = 1 | 2 | 8 | 4;
    return COMMON8(d, 0x14);
}

/* Reset, negotiate VERSION_1, set up queue 0, DRIVER_OK. Returns the status read back. */
static __attribute__((unused)) u8 virtio_start(struct virtio_dev *d) {
    memset(d->q, 0, sizeof(*d->q));
    if (!virtio_negotiate(d)) return COMMON8(d, 0x14);
    /* MSI-X vector 0 is used only if the driver enabled MSI-X. */
    return virtio_enable_queue(d, VIRTQ_SIZE, (u64)d->q->desc, (u64)&d->q->avail, (u64)&d->q->used, 0);
}

/* Submits the chain starting at descriptor `head`; waits for it; returns the used length or -1 on timeout. */
static __attribute__((unused)) s64 virtio_submit(struct virtio_dev *d, u16 head) {
    d->q->avail.ring[d->avail_idx % VIRTQ_SIZE] = head;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    d->q->avail.idx = ++d->avail_idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)(d->notify + 4 * d->qindex) = d->qindex;
    for (u32 spin = 0; spin < 200000; spin++) {
        if (*(volatile u16 *)&d->q->used.idx != d->used_seen) {
            u32 len = d->q->used.ring[d->used_seen % VIRTQ_SIZE].len;
            d->used_seen++;
            return len;
        }
        cpu_relax();
    }
    return -1;
}

/* One writable buffer as a one-descriptor chain. */
static __attribute__((unused)) s64 virtio_read_into(struct virtio_dev *d, void *buf, u32 len) {
    d->q->desc[0] = (struct virtq_desc){ (u64)buf, len, VIRTQ_DESC_F_WRITE, 0 };
    return virtio_submit(d, 0);
}
#endif
