#include "virtq.h"

/* A hostile driver locks the page holding its queue's used ring after
 * DRIVER_OK, then submits a request. The device must not write the locked
 * page (not even the used element and index): it refuses, reports a
 * dma-write violation and asks for a reset (NEEDS_RESET).
 * Command line: "rng" (virtio-rng) or "blk" (virtio-blk). */
static struct {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} rings ALIGNED_PAGE;
static union used_page used ALIGNED_PAGE;  /* alone on its page */
static u8 before[4096];
static u8 buffer[4096] ALIGNED_PAGE;
static struct blk_req req ALIGNED_PAGE;
static volatile u8 blk_status;

/* Makes one request on descriptor 0 (rng: 64 random bytes; blk: read sector 0) and notifies. */
static void submit(struct vq *q, int blk) {
    if (blk) {
        req = (struct blk_req){ VIRTIO_BLK_T_IN, 0, 0 };
        blk_status = 0xee;
        vq_blk_chain(q, 0, &req, buffer, 512, 1, &blk_status);
    } else {
        vq_desc_in(q, 0, buffer, 64);
    }
    vq_post(q, 0);
    vq_notify(q);
}

void guest_main(void) {
    int blk = cmdline_has("blk");
    struct virtio_dev d = {0};
    if (virtio_find(blk ? 0x1042 : 0x1044, &d, 0)) { puts("no device\n"); return; }
    struct vq q;
    printf("status=%x\n", vq_start(&q, &d, rings.desc, &rings.avail, &used.used));

    submit(&q, blk);
    s64 len = vq_wait(&q, 200000);
    printf("first request: len=%ld blk_status=%u used_idx=%u\n", len, blk ? blk_status : 0, q.used->idx);

    memcpy(before, used.bytes, 4096);
    printf("lock used ring page rc=%ld\n", heki_protect((u64)&used, (u64)&used + 4096, HEKI_READ));

    submit(&q, blk);
    /* The device either completes (it wrote the locked page) or asks for a reset. */
    u32 spins;
    u8 st = 0;
    for (spins = 0; spins < 20000; spins++) {
        st = vq_status(&q);
        if ((st & VIRTIO_STATUS_NEEDS_RESET) || q.used->idx != q.used_seen) break;
        cpu_relax();
    }
    /* Let a late write land before comparing. */
    for (volatile u32 i = 0; i < 2000; i++) cpu_relax();
    st = vq_status(&q);
    u32 changed = 0;
    for (u32 i = 0; i < 4096; i++) changed += ((volatile u8 *)used.bytes)[i] != before[i];
    printf("second request: spins=%u used_idx=%u\n", spins, q.used->idx);
    printf("locked used page changed=%u status=%x needs_reset=%d\n", changed, st,
           (st & VIRTIO_STATUS_NEEDS_RESET) != 0);
    puts("used ring scenario done\n");
}
