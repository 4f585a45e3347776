#include "virtq.h"

/* PRIVATE_MEMORY(1) while a device reads guest memory (issue 20, break 1).
 * vCPU 1 keeps the disk busy with 1 MiB writes (the device reads guest
 * memory) from a buffer; vCPU 0 waits until a batch is in flight, waits a
 * little more (a different delay on each boot, from the TSC), then turns
 * private memory on. The buffer and the rings become private under the
 * device's feet: the VMM must wait for the copy in flight and refuse the
 * copies after it, never fault on its own view of guest memory. */
#define TRANSFER (1UL << 20)
#define BUFFER_BASE 0x4000000UL /* 64 MiB: well above the guest image */
#define BATCH 8
#define WAIT_SPINS 20000000u

static struct {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} rings ALIGNED_PAGE;
static union used_page used ALIGNED_PAGE;
static struct vq q;
static struct blk_req req[BATCH] ALIGNED_PAGE;
static volatile u8 blk_status[BATCH];
static volatile u32 started, stop, batches, timeouts;

void ap_main(unsigned cpu) {
    if (cpu != 1) return;
    u8 *buffer = (u8 *)BUFFER_BASE;
    while (!stop) {
        for (u16 j = 0; j < BATCH; j++) {
            req[j] = (struct blk_req){ VIRTIO_BLK_T_OUT, 0, 0 };
            blk_status[j] = 0xee;
            vq_blk_chain(&q, (u16)(3 * j), &req[j], buffer, TRANSFER, 0, &blk_status[j]);
            vq_post(&q, (u16)(3 * j));
        }
        vq_notify(&q);
        started = 1;
        u32 got = 0, s = 0;
        while (got < BATCH && s < WAIT_SPINS && !stop) {
            if (vq_take(&q)) got++; else { cpu_relax(); s++; }
        }
        if (got < BATCH) { timeouts++; break; }
        batches++;
    }
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1042, &d, 0)) { puts("no virtio-block\n"); return; }
    printf("status=%x\n", vq_start(&q, &d, rings.desc, &rings.avail, &used.used));
    for (u64 i = 0; i < TRANSFER; i += 4096) ((volatile u8 *)BUFFER_BASE)[i] = (u8)i;
    unsigned cpus = smp_start_async();
    printf("cpus=%u\n", cpus);
    if (cpus < 2) return;
    while (!started) cpu_relax();
    u64 end = rdtsc() + (rdtsc() % 200000);
    while (rdtsc() < end) cpu_relax();
    s64 rc = heki_call(HEKI_PRIVATE_MEMORY, 1, 0, 0);
    printf("private_memory(1) with a transfer in flight: %ld\n", rc);
    stop = 1;
    /* The VMM is still here: a doorbell round trip answers. */
    printf("after: query=%lx\n", (u64)heki_call(HEKI_QUERY, (u64)BUFFER_BASE, 0, 0) & 0x200);
    puts("vmm survived\n");
}
