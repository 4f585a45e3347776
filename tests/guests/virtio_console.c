#include "virtio.h"

/* Writes a line through virtio-console's transmit queue (queue 1). */
static struct virtq_page queue ALIGNED_PAGE;
static char message[] = "hello from the virtio console\n";

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1043, &d, &queue)) { puts("no virtio-console\n"); return; }
    d.qindex = 1;
    printf("status=%x queues=%u\n", virtio_start(&d), *(volatile u16 *)(d.common + 0x12));
    d.q->desc[0] = (struct virtq_desc){ (u64)message, sizeof(message) - 1, 0, 0 };
    printf("sent: %ld\n", virtio_submit(&d, 0));
}
