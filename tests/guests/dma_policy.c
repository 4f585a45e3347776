#include "virtq.h"

/* One DMA violation, to check each heki policy: the guest makes two rng
 * requests available with a single notify, A into a page it locked and B
 * into normal memory, then reports what landed.
 * "linger": after reporting, keep running a while before powering off (so
 * that a VM the policy should have stopped is seen going on). */
static struct {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} rings ALIGNED_PAGE;
static union used_page used ALIGNED_PAGE;
static u8 locked[4096] ALIGNED_PAGE;
static u8 normal[4096] ALIGNED_PAGE;

static int nonzero(const u8 *p, u32 n) {
    int c = 0;
    for (u32 i = 0; i < n; i++) c += ((volatile const u8 *)p)[i] != 0;
    return c;
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1044, &d, 0)) { puts("no virtio-rng\n"); return; }
    struct vq q;
    printf("status=%x\n", vq_start(&q, &d, rings.desc, &rings.avail, &used.used));
    printf("protect rc=%ld\n", heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ));

    vq_desc_in(&q, 0, locked, 64);
    vq_desc_in(&q, 1, normal, 64);
    vq_post(&q, 0);
    vq_post(&q, 1);
    vq_notify(&q);
    puts("submitted A (locked) and B (normal)\n");
    s64 len[2] = { -1, -1 };
    u32 ids[2] = { 99, 99 };
    for (int i = 0; i < 2; i++) {
        u32 spins = 0;
        while (!vq_take(&q) && spins++ < 20000000u) cpu_relax();
        if (spins > 20000000u) break;
        ids[i] = q.used->ring[(u16)(q.used_seen - 1) % VQ_SIZE].id;
        len[i] = q.last_len;
    }
    s64 len_a = ids[0] == 0 ? len[0] : ids[1] == 0 ? len[1] : -1;
    s64 len_b = ids[0] == 1 ? len[0] : ids[1] == 1 ? len[1] : -1;
    printf("A: len=%ld locked_nonzero=%d\n", len_a, nonzero(locked, 64));
    printf("B: len=%ld normal_nonzero=%d\n", len_b, nonzero(normal, 64));
    puts("dma policy done\n");
    if (cmdline_has("linger")) {
        for (u32 i = 0; i < 20000; i++) heki_call(HEKI_QUERY, (u64)normal, 0, 0);
        puts("still running after the violation\n");
    }
}
