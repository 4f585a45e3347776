#include "virtq.h"

/* DMA in flight across a lock. vCPU 1 keeps reading 1 MiB (the device's
 * largest transfer) from a disk whose sectors alternate 0xAB/0xCD into a
 * window of memory, alternating the start sector so each completed read
 * flips every byte of the window. vCPU 0 locks a few bytes in the middle of
 * the window with PROTECT_BYTES while a read is in flight, records them when
 * the call returns and compares once vCPU 1's reads are over: once the
 * locking call has returned, nothing may change them.
 * Protections are permanent, so each trial gets its own window. */
#define TRIALS 300
#define TRANSFER (1UL << 20)
#define WINDOW_BASE 0x4000000UL /* 64 MiB: well above the guest image */
#define WINDOW_STRIDE (TRANSFER + PAGE_SIZE)
/* In the last page of the transfer: the device's copy reaches it last. */
#define LOCK_OFFSET (TRANSFER - PAGE_SIZE + 100)
#define LOCK_LEN 8
#define WAIT_SPINS 50000000u

static struct {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} rings ALIGNED_PAGE;
static union used_page used ALIGNED_PAGE;
static struct vq q;
/* Each batch: BATCH chains of (header, 1 MiB into the window, status). */
#define BATCH 10
static struct blk_req req[BATCH] ALIGNED_PAGE;
static volatile u8 blk_status[BATCH];

static volatile u32 trial_go, trial_stop, trial_ack;
static volatile u32 reads_done, read_timeouts, read_ok, read_ioerr;
static volatile u64 batch_tsc; /* how long a batch takes, measured during the warm-up */
static u64 warmup_lock_tsc;     /* how long a lock call takes, measured during the warm-up */

static u8 *window(u32 trial) { return (u8 *)(WINDOW_BASE + (u64)trial * WINDOW_STRIDE); }
static u16 avail_idx(void) { return *(volatile u16 *)&rings.avail.idx; }
static u16 used_idx(void) { return q.used->idx; }
static u64 locked_bytes(u32 trial) { return *(volatile u64 *)(window(trial) + LOCK_OFFSET); }

/* The reader: keeps the device busy reading into the trial's window until told to stop. */
void ap_main(unsigned cpu) {
    if (cpu != 1) return;
    u32 seen = 0, flip = 0;
    for (;;) {
        while (trial_go == seen) cpu_relax();
        seen = trial_go;
        u8 *win = window(seen - 1);
        u32 n = 0;
        u64 tsc = 0;
        while (trial_stop != seen) {
            u64 t0 = rdtsc();
            for (u16 j = 0; j < BATCH; j++) {
                req[j] = (struct blk_req){ VIRTIO_BLK_T_IN, 0, flip++ & 1 };
                blk_status[j] = 0xee;
                vq_blk_chain(&q, (u16)(3 * j), &req[j], win, TRANSFER, 1, &blk_status[j]);
                vq_post(&q, (u16)(3 * j));
            }
            vq_notify(&q);
            u32 got = 0, s = 0;
            while (got < BATCH && s < WAIT_SPINS) {
                if (vq_take(&q)) got++; else { cpu_relax(); s++; }
            }
            if (got < BATCH) { read_timeouts++; break; }
            tsc += rdtsc() - t0;
            for (u16 j = 0; j < BATCH; j++) {
                if (blk_status[j] == 0) read_ok++; else read_ioerr++;
            }
            n++;
            reads_done = n * BATCH;
        }
        if (n) batch_tsc = tsc / n;
        trial_ack = seen;
    }
}

static void delay_tsc(u64 cycles) { u64 end = rdtsc() + cycles; while (rdtsc() < end) cpu_relax(); }

static u32 inflight_at_lock, inflight_across, changed, lock_errors;
static u64 lock_tsc_total;

/* Runs trial `t` (0-based): locks bytes of its window while the reader reads into it. */
static void trial(u32 t, int lock) {
    u32 id = t + 1;
    reads_done = 0;
    trial_go = id;
    u32 s = 0;
    while (reads_done < BATCH && s++ < WAIT_SPINS) cpu_relax();
    if (!lock) {
        /* Warm-up: measure how long a batch and a lock take. */
        u64 t0 = rdtsc();
        heki_call(HEKI_PROTECT_BYTES, (u64)window(t), LOCK_LEN, 0);
        warmup_lock_tsc = rdtsc() - t0;
        while (reads_done < 4 * BATCH && s++ < WAIT_SPINS) cpu_relax();
        trial_stop = id;
        while (trial_ack != id) cpu_relax();
        return;
    }
    while (avail_idx() == used_idx() && s++ < WAIT_SPINS) cpu_relax();
    /* Lock at a different point of the batch in each trial, ending before the batch does. */
    u64 lock_tsc = t ? lock_tsc_total / t : warmup_lock_tsc;
    u64 spread = batch_tsc > 2 * lock_tsc ? batch_tsc - lock_tsc : batch_tsc / 2;
    delay_tsc((u64)t * 7919 % (spread + 1));
    u16 a0 = avail_idx(), u0 = used_idx();
    u64 t0 = rdtsc();
    s64 rc = heki_call(HEKI_PROTECT_BYTES, (u64)window(t) + LOCK_OFFSET, LOCK_LEN, 0);
    u64 at_return = locked_bytes(t);
    lock_tsc_total += rdtsc() - t0;
    u16 u1 = used_idx();
    trial_stop = id;
    while (trial_ack != id) cpu_relax();
    u64 later = locked_bytes(t);
    int was_inflight = a0 != u0;
    if (rc != 0) lock_errors++;
    inflight_at_lock += was_inflight;
    inflight_across += a0 != u1;
    if (later != at_return) {
        changed++;
        if (changed <= 5)
            printf("trial %u: locked bytes changed after the lock returned: %lx -> %lx (in flight at lock=%d)\n", t,
                   at_return, later, was_inflight);
    }
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1042, &d, 0)) { puts("no virtio-block\n"); return; }
    printf("status=%x capacity=%lu\n", vq_start(&q, &d, rings.desc, &rings.avail, &used.used), *(volatile u64 *)d.device);
    unsigned cpus = smp_start_async();
    printf("cpus=%u\n", cpus);
    if (cpus < 2) return;
    trial(TRIALS, 0); /* warm-up in the window after the last trial's */
    printf("warm-up: reads=%u tsc per batch of %u reads=%lu tsc per lock=%lu\n", reads_done, BATCH, batch_tsc,
           warmup_lock_tsc);
    for (u32 t = 0; t < TRIALS; t++) trial(t, 1);
    printf("race trials=%u inflight_at_lock=%u inflight_across_lock=%u lock_errors=%u reads_ok=%u reads_ioerr=%u "
           "read_timeouts=%u\n", TRIALS, inflight_at_lock, inflight_across, lock_errors, read_ok, read_ioerr,
           read_timeouts);
    printf("tsc per lock call=%lu\n", lock_tsc_total / TRIALS);
    printf("changed_after_return=%u\n", changed);
}
