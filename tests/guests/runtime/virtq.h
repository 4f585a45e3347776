/* A split virtqueue whose descriptor table, available ring and used ring sit
 * wherever the scenario puts them (e.g. the used ring alone on its own page),
 * with several chains in flight and polling that never blocks. It reuses
 * virtio.h for device discovery (virtio_find) and its ring layouts.
 * Include from a scenario. */
#ifndef VIRTQ_H
#define VIRTQ_H
#include "virtio.h"

#define VIRTIO_STATUS_NEEDS_RESET 0x40

/* Deeper than virtio.h's queue, so that many requests can be in flight. */
#define VQ_SIZE 32
struct vq_avail { u16 flags; u16 idx; u16 ring[VQ_SIZE]; u16 used_event; };
struct vq_used { u16 flags; u16 idx; struct virtq_used_elem ring[VQ_SIZE]; u16 avail_event; };

struct vq {
    struct virtio_dev *d;
    struct virtq_desc *desc;      /* VQ_SIZE entries */
    struct vq_avail *avail;
    volatile struct vq_used *used;
    u16 avail_idx, used_seen;
    u32 last_len;                 /* length of the last completion taken by vq_take */
};

/* A used ring padded to a whole page, so that it can be locked on its own. */
union used_page {
    struct vq_used used;
    u8 bytes[4096];
};

/* Reset, negotiate VERSION_1, program queue d->qindex with these rings, DRIVER_OK.
 * Returns the device status read back. */
static __attribute__((unused)) u8 vq_start(struct vq *q, struct virtio_dev *d, struct virtq_desc *desc,
                                           struct vq_avail *avail, struct vq_used *used) {
    q->d = d;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->avail_idx = q->used_seen = 0;
    memset(desc, 0, VQ_SIZE * sizeof(*desc));
    memset(avail, 0, sizeof(*avail));
    memset(used, 0, sizeof(*used));
    if (!virtio_negotiate(d)) return COMMON8(d, 0x14);
    /* No MSI-X vector: this driver polls. */
    return virtio_enable_queue(d, VQ_SIZE, (u64)desc, (u64)avail, (u64)used, 0xffff);
}

static inline u8 vq_status(struct vq *q) { return COMMON8(q->d, 0x14); }

/* Makes the chain starting at `head` available, without notifying. */
static inline void vq_post(struct vq *q, u16 head) {
    q->avail->ring[q->avail_idx % VQ_SIZE] = head;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)&q->avail->idx = ++q->avail_idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void vq_notify(struct vq *q) {
    *(volatile u16 *)(q->d->notify + 4 * q->d->qindex) = q->d->qindex;
}

/* Chains made available that the device has not completed yet (as the device published it). */
static inline u16 vq_pending(struct vq *q) { return (u16)(q->avail_idx - q->used->idx); }

/* Takes one completion if there is one: 1 (its length in q->last_len) or 0. */
static inline int vq_take(struct vq *q) {
    if (q->used->idx == q->used_seen) return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    q->last_len = q->used->ring[q->used_seen % VQ_SIZE].len;
    q->used_seen++;
    return 1;
}

/* Waits (bounded) for one completion; returns its length, or -1. */
static __attribute__((unused)) s64 vq_wait(struct vq *q, u32 spins) {
    for (u32 i = 0; i < spins; i++) {
        if (vq_take(q)) return q->last_len;
        cpu_relax();
    }
    return -1;
}

/* One device-writable buffer as a one-descriptor chain at descriptor `head`. */
static inline void vq_desc_in(struct vq *q, u16 head, void *buf, u32 len) {
    q->desc[head] = (struct virtq_desc){ (u64)buf, len, VIRTQ_DESC_F_WRITE, 0 };
}

/* virtio-blk: header, one data buffer, status byte, at descriptors head..head+2. */
struct blk_req { u32 type; u32 reserved; u64 sector; };
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
static inline void vq_blk_chain(struct vq *q, u16 head, struct blk_req *req, void *buf, u32 len, int device_writes,
                                volatile u8 *status) {
    q->desc[head] = (struct virtq_desc){ (u64)req, sizeof(*req), VIRTQ_DESC_F_NEXT, (u16)(head + 1) };
    q->desc[head + 1] = (struct virtq_desc){ (u64)buf, len,
                                             (u16)(VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0)),
                                             (u16)(head + 2) };
    q->desc[head + 2] = (struct virtq_desc){ (u64)status, 1, VIRTQ_DESC_F_WRITE, 0 };
}
#endif
