#include "virtio.h"

/* virtio-rng completing a request raises MSI-X vector 0 → guest vector 0x40. */
static struct virtq_page queue ALIGNED_PAGE;
static u8 buffer[64];

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1044, &d, &queue)) { puts("no virtio-rng\n"); return; }
    printf("msix=%d\n", virtio_msix(&d, 0, 0x40));
    u8 status = virtio_start(&d);
    printf("status=%x vector=%u\n", status, COMMON16(&d, 0x1a));
    sti();
    for (int i = 1; i <= 3; i++) {
        s64 len = virtio_read_into(&d, buffer, sizeof(buffer));
        for (u32 spin = 0; spin < 100000 && irq_count[0x40] < (u64)i; spin++) cpu_relax();
        printf("request %d: len=%ld irqs=%lu\n", i, len, irq_count[0x40]);
    }
    cli();
}
