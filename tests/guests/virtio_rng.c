#include "virtio.h"

/* virtio-rng through the DMA guard: a normal buffer fills, a protected one
 * stays untouched, malformed chains never hang the device, and a queue
 * placed in protected memory makes the device ask for a reset. */
static struct virtq_page queue ALIGNED_PAGE;
static struct virtq_page locked_queue ALIGNED_PAGE;
static u8 buffer[4096] ALIGNED_PAGE;
static u8 locked[4096] ALIGNED_PAGE;
/* Room for the 64 KiB the device writes at most per request. */
static u8 scratch[128 * 1024] ALIGNED_PAGE;

static int nonzero(const u8 *p, u32 n) { int c = 0; for (u32 i = 0; i < n; i++) c += p[i] != 0; return c; }

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1044, &d, &queue)) { puts("no virtio-rng\n"); return; }
    printf("status=%x\n", virtio_start(&d));
    s64 len = virtio_read_into(&d, buffer, 64);
    printf("normal: len=%ld nonzero=%d\n", len, nonzero(buffer, 64) > 32);

    printf("protect rc=%ld\n", heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ));
    len = virtio_read_into(&d, locked, 64);
    printf("protected: len=%ld nonzero=%d\n", len, nonzero((u8 *)locked, 64));

    /* Malformed chains: a loop, an address outside RAM, an oversized length. */
    d.q->desc[0] = (struct virtq_desc){ (u64)buffer, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0 };
    printf("loop: len=%ld\n", virtio_submit(&d, 0));
    d.q->desc[0] = (struct virtq_desc){ 0x7ff00000000UL, 16, VIRTQ_DESC_F_WRITE, 0 };
    printf("outside ram: len=%ld\n", virtio_submit(&d, 0));
    d.q->desc[0] = (struct virtq_desc){ (u64)scratch, 0xffffffffu, VIRTQ_DESC_F_WRITE, 0 };
    printf("oversized: len=%ld\n", virtio_submit(&d, 0));
    len = virtio_read_into(&d, buffer, 32);
    printf("still working: len=%ld\n", len);

    /* The queue itself in protected memory. */
    heki_protect((u64)&locked_queue, (u64)&locked_queue + 4096, HEKI_READ);
    d.q = &locked_queue;
    u8 st = virtio_start(&d);
    printf("ring in protected memory: needs_reset=%d\n", (st & 0x40) != 0);
}
