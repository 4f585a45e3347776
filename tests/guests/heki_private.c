#include "virtq.h"

/* Private guest memory: the guest makes its RAM private, shares only the
 * virtio rings and a bounce buffer, and checks that the rng device can fill
 * shared memory but not private memory; then every SET_SHARED error code,
 * QUERY's bits, and a ring left private. With "reboot", it resets at the end
 * (the test checks that the next boot finds all memory shared again). */
static struct {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} rings ALIGNED_PAGE;
static union used_page used ALIGNED_PAGE;
static u8 bounce[4096] ALIGNED_PAGE;
static u8 secret[4096] ALIGNED_PAGE;
static struct {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} private_rings ALIGNED_PAGE;
static union used_page private_used ALIGNED_PAGE;

static s64 share(void *p, u64 len, u64 how) { return heki_call(HEKI_SET_SHARED, (u64)p, len, how); }

static int nonzero(const u8 *p, u32 n) {
    int c = 0;
    for (u32 i = 0; i < n; i++) c += ((volatile const u8 *)p)[i] != 0;
    return c;
}

void guest_main(void) {
    printf("at start: private=%d\n", (heki_call(HEKI_QUERY, (u64)secret, 0, 0) & HEKI_QUERY_PRIVATE) != 0);
    printf("feature shared_memory=%d\n", (heki_features() >> 6) & 1);
    printf("set_shared before private: %ld\n", share(bounce, 4096, 1));
    printf("private_memory(2): %ld\n", heki_call(HEKI_PRIVATE_MEMORY, 2, 0, 0));
    printf("private_memory(1): %ld\n", heki_call(HEKI_PRIVATE_MEMORY, 1, 0, 0));
    printf("private_memory(1) again: %ld\n", heki_call(HEKI_PRIVATE_MEMORY, 1, 0, 0));
    printf("unaligned: %ld\n", heki_call(HEKI_SET_SHARED, (u64)bounce + 8, 4096, 1));
    printf("zero length: %ld\n", share(bounce, 0, 1));
    printf("bad arg2: %ld\n", share(bounce, 4096, 2));
    printf("outside ram: %ld\n", heki_call(HEKI_SET_SHARED, 0xfffff000ull, 4096, 1));
    s64 r1 = share(&rings, 4096, 1), r2 = share(&used, 4096, 1), r3 = share(bounce, 4096, 1);
    printf("share rings: %ld %ld %ld\n", r1, r2, r3);
    u64 q_secret = heki_call(HEKI_QUERY, (u64)secret, 0, 0), q_bounce = heki_call(HEKI_QUERY, (u64)bounce, 0, 0);
    printf("query secret: private=%d unmapped=%d\n", (q_secret & HEKI_QUERY_PRIVATE) != 0,
           (q_secret & HEKI_QUERY_UNMAPPED) != 0);
    printf("query bounce: private=%d\n", (q_bounce & HEKI_QUERY_PRIVATE) != 0);

    struct virtio_dev d = {0};
    if (virtio_find(0x1044, &d, 0)) { puts("no virtio-rng\n"); return; }
    struct vq q;
    printf("status=%x\n", vq_start(&q, &d, rings.desc, &rings.avail, &used.used));
    vq_desc_in(&q, 0, secret, 64);
    vq_post(&q, 0);
    vq_notify(&q);
    s64 len = vq_wait(&q, 20000000u);
    printf("into private: len=%ld nonzero=%d\n", len, nonzero(secret, 64));
    vq_desc_in(&q, 0, bounce, 64);
    vq_post(&q, 0);
    vq_notify(&q);
    len = vq_wait(&q, 20000000u);
    printf("into shared bounce: len=%ld nonzero=%d\n", len, nonzero(bounce, 64) > 0);
    for (int i = 0; i < 64; i++) secret[i] = bounce[i];
    printf("copied into private: nonzero=%d\n", nonzero(secret, 64) > 0);
    s64 unshared = share(bounce, 4096, 0); /* before the QUERY: argument order is unspecified */
    printf("unshare bounce: %ld query private=%d\n", unshared,
           (heki_call(HEKI_QUERY, (u64)bounce, 0, 0) & HEKI_QUERY_PRIVATE) != 0);

    /* A second device start with its rings left private. */
    struct vq p;
    u8 status = vq_start(&p, &d, private_rings.desc, &private_rings.avail, &private_used.used);
    printf("private rings: needs_reset=%d\n", (status & VIRTIO_STATUS_NEEDS_RESET) != 0);
    puts("private scenario done\n");
    if (cmdline_has("reboot")) reboot_kbd();
}
