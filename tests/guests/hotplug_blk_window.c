#include "virtio.h"

/* virtio-block buffers in the hotplug window: unplugged, across the
 * plugged end, and just plugged. */
#define MEM_PORT 0xce0
#define WINDOW 0x100000000UL
#define SLOT (128UL << 20)

struct blk_req { u32 type; u32 reserved; u64 sector; };

static struct virtq_page queue ALIGNED_PAGE;
static struct blk_req req ALIGNED_PAGE;
static u8 status_byte;
static u8 data[4096] ALIGNED_PAGE;

static u8 blk(struct virtio_dev *d, u32 type, u64 sector, u64 buf, u32 len, int device_writes) {
    req = (struct blk_req){ type, 0, sector };
    status_byte = 0xee;
    d->q->desc[0] = (struct virtq_desc){ (u64)&req, sizeof(req), VIRTQ_DESC_F_NEXT, 1 };
    d->q->desc[1] = (struct virtq_desc){ buf, len, (u16)(VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0)), 2 };
    d->q->desc[2] = (struct virtq_desc){ (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0 };
    if (virtio_submit(d, 0) < 0) return 0xee;
    return *(volatile u8 *)&status_byte;
}

static u32 mem_status(u32 slot) { outl(MEM_PORT, slot); return inl(MEM_PORT + 4); }

static void restart(struct virtio_dev *d) {
    d->avail_idx = d->used_seen = 0;
    virtio_start(d);
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1042, &d, &queue)) { puts("no virtio-block\n"); return; }
    virtio_start(&d);
    printf("unplugged read: %u\n", blk(&d, 0, 0, WINDOW, 512, 1));
    restart(&d);
    printf("unplugged write: %u\n", blk(&d, 1, 2, WINDOW, 512, 0));
    restart(&d);
    printf("straddling read: %u\n", blk(&d, 0, 0, WINDOW - 256, 512, 1));
    restart(&d);
    printf("normal read: %u data=%s\n", blk(&d, 0, 0, (u64)data, 512, 1), (char *)data);

    puts("waiting for memory\n");
    while (!(mem_status(0) & 1)) cpu_relax();
    printf("plugged read: %u\n", blk(&d, 0, 0, WINDOW + 0x1000, 512, 1));
    printf("plugged write: %u\n", blk(&d, 1, 3, WINDOW + 0x1000, 512, 0));
    printf("across the plugged end: %u\n", blk(&d, 0, 0, WINDOW + SLOT - 256, 512, 1));
    restart(&d);
    printf("past the plugged end: %u\n", blk(&d, 1, 2, WINDOW + SLOT, 512, 0));
    restart(&d);
    memset(data, 0, 512);
    printf("sector 3: %u data=%s\n", blk(&d, 0, 3, (u64)data, 512, 1), (char *)data);
    puts("blk window done\n");
    for (;;) cpu_relax();
}
