#include "virtio.h"

/* virtio-block through the DMA guard. */
struct blk_req { u32 type; u32 reserved; u64 sector; };

static struct virtq_page queue ALIGNED_PAGE;
static struct blk_req req ALIGNED_PAGE;
static u8 status_byte;
static u8 data[4096] ALIGNED_PAGE;
static u8 locked[4096] ALIGNED_PAGE;
static char id[32];

/* header, one data buffer, status. Returns the status byte (or 0xee on timeout). */
static u8 blk(struct virtio_dev *d, u32 type, u64 sector, void *buf, u32 len, int device_writes) {
    req = (struct blk_req){ type, 0, sector };
    status_byte = 0xee;
    d->q->desc[0] = (struct virtq_desc){ (u64)&req, sizeof(req), VIRTQ_DESC_F_NEXT, 1 };
    d->q->desc[1] = (struct virtq_desc){ (u64)buf, len, (u16)(VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0)), 2 };
    d->q->desc[2] = (struct virtq_desc){ (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0 };
    if (virtio_submit(d, 0) < 0) return 0xee;
    return *(volatile u8 *)&status_byte;
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1042, &d, &queue)) { puts("no virtio-block\n"); return; }
    printf("status=%x capacity=%lu\n", virtio_start(&d), *(volatile u64 *)d.device);
    u64 capacity = *(volatile u64 *)d.device;

    memcpy(data, "HEKIDISK sector zero", 21);
    printf("write: %u\n", blk(&d, 1, 0, data, 512, 0));
    memset(data, 0, 512);
    printf("read: %u data=%s\n", blk(&d, 0, 0, data, 512, 1), (char *)data);
    printf("get-id: %u id=%s\n", blk(&d, 8, 0, id, 20, 1), id);
    printf("flush: %u\n", blk(&d, 4, 0, data, 0, 0));
    printf("out of bounds: %u\n", blk(&d, 0, capacity, data, 512, 1));
    printf("unsupported: %u\n", blk(&d, 99, 0, data, 512, 1));

    memcpy(locked, "LOCKED PAGE", 12);
    printf("protect rc=%ld\n", heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ));
    printf("read into protected: %u page=%s\n", blk(&d, 0, 0, locked, 512, 1), (char *)locked);
    printf("write from protected: %u\n", blk(&d, 1, 1, locked, 512, 0));
    memset(data, 0, 512);
    blk(&d, 0, 1, data, 512, 1);
    printf("sector 1=%s\n", (char *)data);
}
