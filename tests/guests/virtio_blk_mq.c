#include "virtq.h"

/* Multi-queue virtio-blk: the driver negotiates VIRTIO_BLK_F_MQ, starts two
 * request queues, keeps requests in flight on both at once (each queue is
 * served by its own device worker), reads back what the other queue wrote,
 * then asks queue 1 to read into a page heki locked: refused, page intact,
 * and queue 0 still serves. */
#define VIRTIO_BLK_F_MQ (1u << 12)
#define PER_QUEUE 8
#define CHUNK 4096
#define WAIT_SPINS 20000000u

/* Each queue's descriptors and available ring in a page of their own. */
struct rings {
    struct virtq_desc desc[VQ_SIZE];
    struct vq_avail avail;
} ALIGNED_PAGE;
static struct rings rings[2] ALIGNED_PAGE;
static union used_page used[2] ALIGNED_PAGE;
static struct vq q[2];
static struct blk_req req[2][PER_QUEUE] ALIGNED_PAGE;
static volatile u8 st[2][PER_QUEUE];
static u8 buf[2][PER_QUEUE][CHUNK] ALIGNED_PAGE;
static u8 locked[4096] ALIGNED_PAGE;
static u8 want[CHUNK];

/* Reset, negotiate VERSION_1 and MQ; true if FEATURES_OK stuck. */
static int negotiate_mq(struct virtio_dev *d) {
    COMMON8(d, 0x14) = 0;
    COMMON8(d, 0x14) = 1 | 2;
    COMMON32(d, 0x00) = 0;
    if (!(COMMON32(d, 0x04) & VIRTIO_BLK_F_MQ)) return 0;
    COMMON32(d, 0x08) = 1;
    COMMON32(d, 0x0c) = 1; /* VIRTIO_F_VERSION_1 (bit 32) */
    COMMON32(d, 0x08) = 0;
    COMMON32(d, 0x0c) = VIRTIO_BLK_F_MQ;
    COMMON8(d, 0x14) = 1 | 2 | 8;
    return (COMMON8(d, 0x14) & 8) != 0;
}

static void program(struct virtio_dev *d, u16 index) {
    struct vq *v = &q[index];
    v->d = d;
    v->desc = rings[index].desc;
    v->avail = &rings[index].avail;
    v->used = &used[index].used;
    COMMON16(d, 0x16) = index;
    COMMON16(d, 0x18) = VQ_SIZE;
    u64 desc = (u64)v->desc, avail = (u64)v->avail, usedp = (u64)v->used;
    COMMON32(d, 0x20) = (u32)desc; COMMON32(d, 0x24) = (u32)(desc >> 32);
    COMMON32(d, 0x28) = (u32)avail; COMMON32(d, 0x2c) = (u32)(avail >> 32);
    COMMON32(d, 0x30) = (u32)usedp; COMMON32(d, 0x34) = (u32)(usedp >> 32);
    COMMON16(d, 0x1a) = 0xffff;
    COMMON16(d, 0x1c) = 1;
}

/* "queue I request J" at the start of a zeroed chunk. */
static void tag(u8 *chunk, u16 i, u16 j) {
    memcpy(chunk, "queue I request J", 18);
    chunk[6] = (u8)('0' + i);
    chunk[16] = (u8)('0' + j);
}

/* Notifies queue `index` (virtq.h's vq_notify uses the device's one queue). */
static void notify(u16 index) { *(volatile u16 *)(q[index].d->notify + 4 * index) = index; }

/* Posts PER_QUEUE requests of `type` on both queues, notifies both, waits
 * for all; returns how many completed with status 0. Queue i, request j
 * uses sector 2 * (j * 2 + i) for writes, and the other queue's sector for reads. */
static u32 both_queues(u32 type) {
    for (u16 i = 0; i < 2; i++) {
        for (u16 j = 0; j < PER_QUEUE; j++) {
            u16 writer = (u16)(type == VIRTIO_BLK_T_OUT ? i : 1 - i);
            req[i][j] = (struct blk_req){ type, 0, 16 * (u64)(j * 2 + writer) };
            st[i][j] = 0xee;
            vq_blk_chain(&q[i], (u16)(3 * j), &req[i][j], buf[i][j], CHUNK, type == VIRTIO_BLK_T_IN, &st[i][j]);
            vq_post(&q[i], (u16)(3 * j));
        }
    }
    notify(0);
    notify(1);
    u32 got[2] = { 0, 0 }, ok = 0;
    for (u32 spin = 0; spin < WAIT_SPINS && got[0] + got[1] < 2 * PER_QUEUE; spin++) {
        for (u16 i = 0; i < 2; i++) got[i] += (u32)vq_take(&q[i]);
        cpu_relax();
    }
    for (u16 i = 0; i < 2; i++)
        for (u16 j = 0; j < PER_QUEUE; j++) ok += st[i][j] == 0;
    return ok;
}

/* One request on queue `index`, waited for; returns its status (0xee on timeout). */
static u8 one(u16 index, u32 type, u64 sector, void *data) {
    static struct blk_req r;
    static volatile u8 s;
    r = (struct blk_req){ type, 0, sector };
    s = 0xee;
    vq_blk_chain(&q[index], 0, &r, data, 512, type == VIRTIO_BLK_T_IN, &s);
    vq_post(&q[index], 0);
    notify(index);
    vq_wait(&q[index], WAIT_SPINS);
    return s;
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1042, &d, 0)) { puts("no virtio-block\n"); return; }
    printf("num_queues=%u config num_queues=%u\n", COMMON16(&d, 0x12), *(volatile u16 *)(d.device + 34));
    if (!negotiate_mq(&d)) { puts("no MQ\n"); return; }
    program(&d, 0);
    program(&d, 1);
    COMMON8(&d, 0x14) = 1 | 2 | 8 | 4;
    printf("status=%x\n", COMMON8(&d, 0x14));

    for (u16 i = 0; i < 2; i++)
        for (u16 j = 0; j < PER_QUEUE; j++) {
            memset(buf[i][j], 0, CHUNK);
            tag(buf[i][j], i, j);
        }
    printf("writes on both queues ok=%u\n", both_queues(VIRTIO_BLK_T_OUT));
    memset(buf, 0, sizeof(buf));
    u32 reads = both_queues(VIRTIO_BLK_T_IN);
    /* Queue 0 read what queue 1 wrote, and the other way round. */
    u32 match = 0;
    for (u16 i = 0; i < 2; i++)
        for (u16 j = 0; j < PER_QUEUE; j++) {
            memset(want, 0, CHUNK);
            tag(want, (u16)(1 - i), j);
            match += memcmp(buf[i][j], want, CHUNK) == 0;
        }
    printf("reads on both queues ok=%u match=%u\n", reads, match);

    memcpy(locked, "LOCKED PAGE", 12);
    printf("protect rc=%ld\n", heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ));
    printf("queue 1 read into protected: %u page=%s\n", one(1, VIRTIO_BLK_T_IN, 0, locked), (char *)locked);
    memset(buf[0][0], 0, 512);
    printf("queue 0 after: %u data=%s\n", one(0, VIRTIO_BLK_T_IN, 32, buf[0][0]), (char *)buf[0][0]);
}
