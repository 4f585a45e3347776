#include "virtio.h"

/* A disk added while the guest runs (vm.add-disk, tests/hotplug.rs): the
 * guest locks a page through heki, then scans the PCI bus until a
 * virtio-block device appears, reads sector 0 into normal memory and into
 * the locked page (a hot-added device meets the same DMA guard), and halts
 * so that the host can remove the device from a live VM. */
struct blk_req { u32 type; u32 reserved; u64 sector; };

static struct virtq_page queue ALIGNED_PAGE;
static struct blk_req req ALIGNED_PAGE;
static u8 status_byte;
static u8 data[4096] ALIGNED_PAGE;
static u8 locked[4096] ALIGNED_PAGE;

static u8 blk_read(struct virtio_dev *d, u64 sector, void *buf) {
    req = (struct blk_req){ 0, 0, sector };
    status_byte = 0xee;
    d->q->desc[0] = (struct virtq_desc){ (u64)&req, sizeof(req), VIRTQ_DESC_F_NEXT, 1 };
    d->q->desc[1] = (struct virtq_desc){ (u64)buf, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2 };
    d->q->desc[2] = (struct virtq_desc){ (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0 };
    if (virtio_submit(d, 0) < 0) return 0xee;
    return *(volatile u8 *)&status_byte;
}

void guest_main(void) {
    memcpy(locked, "LOCKED PAGE", 12);
    printf("protect rc=%ld\n", heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ));
    puts("waiting for a disk\n");
    struct virtio_dev d = {0};
    while (virtio_find(0x1042, &d, &queue))
        for (volatile u32 i = 0; i < 2000; i++) cpu_relax();
    printf("found a disk in slot %u\n", d.slot);
    printf("status=%x\n", virtio_start(&d));
    printf("read: %u data=%s\n", blk_read(&d, 0, data), (char *)data);
    printf("read into protected: %u page=%s\n", blk_read(&d, 0, locked), (char *)locked);
    puts("hotplug dma done\n");
    for (;;) __asm__ volatile("cli; hlt");
}
