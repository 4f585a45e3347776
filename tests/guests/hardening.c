#include "virtio.h"

/* For the process-hardening tests (tests/hardening.rs): puts every device
 * worker to work once (rng read, disk write and flush, console write), then
 * ticks forever so the test can inspect the threads and signal the VMM
 * (or, with reboot=kbd on the command line, reboots). */
struct blk_req { u32 type; u32 reserved; u64 sector; };

static struct virtq_page rng_queue ALIGNED_PAGE;
static struct virtq_page blk_queue ALIGNED_PAGE;
static struct virtq_page con_queue ALIGNED_PAGE;
static struct blk_req req ALIGNED_PAGE;
static u8 status_byte;
static u8 data[4096] ALIGNED_PAGE;
static char message[] = "console line from the hardening guest\n";

static u8 blk(struct virtio_dev *d, u32 type, void *buf, u32 len) {
    req = (struct blk_req){ type, 0, 0 };
    status_byte = 0xee;
    d->q->desc[0] = (struct virtq_desc){ (u64)&req, sizeof(req), VIRTQ_DESC_F_NEXT, 1 };
    d->q->desc[1] = (struct virtq_desc){ (u64)buf, len, VIRTQ_DESC_F_NEXT, 2 };
    d->q->desc[2] = (struct virtq_desc){ (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0 };
    if (virtio_submit(d, 0) < 0) return 0xee;
    return *(volatile u8 *)&status_byte;
}

void guest_main(void) {
    struct virtio_dev rng = {0}, disk = {0}, con = {0};
    if (!virtio_find(0x1044, &rng, &rng_queue)) {
        virtio_start(&rng);
        printf("rng: %ld\n", virtio_read_into(&rng, data, 32));
    }
    if (!virtio_find(0x1042, &disk, &blk_queue)) {
        virtio_start(&disk);
        memcpy(data, "HARDENING DISK", 15);
        u8 written = blk(&disk, 1, data, 512);
        printf("disk: write %u flush %u\n", written, blk(&disk, 4, data, 0));
    }
    if (!virtio_find(0x1043, &con, &con_queue)) {
        con.qindex = 1;
        virtio_start(&con);
        con.q->desc[0] = (struct virtq_desc){ (u64)message, sizeof(message) - 1, 0, 0 };
        printf("console: %ld\n", virtio_submit(&con, 0));
    }
    puts("devices done\n");
    if (cmdline_has("reboot=kbd")) reboot_kbd();
    for (u64 n = 0;; n++) {
        printf("tick %lu\n", n);
        for (volatile u32 i = 0; i < 20000; i++) cpu_relax();
    }
}
