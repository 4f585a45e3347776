#include "virtio.h"

/* Writes a line through virtio-console's transmit queue (queue 1). With
 * "echo" on the command line it also posts receive buffers (queue 0), small
 * so that a line spans several, and echoes the first line it receives to the
 * serial port ("echo: ...") and back through the transmit queue. */
static struct virtq_page rxq ALIGNED_PAGE;
static struct virtq_page txq ALIGNED_PAGE;
static char rxbuf[VIRTQ_SIZE][8] ALIGNED_PAGE;
static char message[] = "hello from the virtio console\n";
static char line[256];

static void setup_queue(struct virtio_dev *d, u16 index, struct virtq_page *q) {
    COMMON16(d, 0x16) = index;
    COMMON16(d, 0x18) = VIRTQ_SIZE;
    u64 desc = (u64)q->desc, avail = (u64)&q->avail, used = (u64)&q->used;
    COMMON32(d, 0x20) = (u32)desc; COMMON32(d, 0x24) = (u32)(desc >> 32);
    COMMON32(d, 0x28) = (u32)avail; COMMON32(d, 0x2c) = (u32)(avail >> 32);
    COMMON32(d, 0x30) = (u32)used; COMMON32(d, 0x34) = (u32)(used >> 32);
    COMMON16(d, 0x1c) = 1;
}

static void post_rx(struct virtio_dev *d, u16 id) {
    rxq.desc[id] = (struct virtq_desc){ (u64)rxbuf[id], sizeof(rxbuf[id]), VIRTQ_DESC_F_WRITE, 0 };
    rxq.avail.ring[rxq.avail.idx % VIRTQ_SIZE] = id;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    rxq.avail.idx++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)(d->notify) = 0;
}

/* Receives until a newline (or a full line buffer); the length, or -1 if nothing came. */
static s64 receive_line(struct virtio_dev *d) {
    u32 len = 0;
    u16 seen = 0;
    for (u32 i = 0; i < VIRTQ_SIZE; i++) post_rx(d, i);
    /* Each wait reads the serial status port: an exit, so the wait lasts seconds, not cycles. */
    for (u32 wait = 0; wait < 3000000; wait++) {
        while (*(volatile u16 *)&rxq.used.idx != seen) {
            struct virtq_used_elem el = rxq.used.ring[seen % VIRTQ_SIZE];
            seen++;
            for (u32 j = 0; j < el.len && j < sizeof(rxbuf[0]) && len < sizeof(line) - 1; j++) {
                line[len++] = rxbuf[el.id][j];
                if (line[len - 1] == '\n' || len == sizeof(line) - 1) return len;
            }
            post_rx(d, el.id);
        }
        (void)inb(0x3fd);
    }
    return len ? len : -1;
}

void guest_main(void) {
    struct virtio_dev d = {0};
    if (virtio_find(0x1043, &d, &txq)) { puts("no virtio-console\n"); return; }
    d.qindex = 1;
    memset(&rxq, 0, sizeof(rxq));
    memset(&txq, 0, sizeof(txq));
    if (!virtio_negotiate(&d)) { puts("features refused\n"); return; }
    setup_queue(&d, 0, &rxq);
    setup_queue(&d, 1, &txq);
    COMMON8(&d, 0x14) = 1 | 2 | 8 | 4;
    printf("status=%x queues=%u\n", COMMON8(&d, 0x14), COMMON16(&d, 0x12));
    txq.desc[0] = (struct virtq_desc){ (u64)message, sizeof(message) - 1, 0, 0 };
    printf("sent: %ld\n", virtio_submit(&d, 0));
    if (!cmdline_has("echo")) return;
    s64 n = receive_line(&d);
    if (n < 0) { puts("no input\n"); return; }
    line[n] = 0;
    printf("echo: %s", line);
    txq.desc[0] = (struct virtq_desc){ (u64)line, (u32)n, 0, 0 };
    printf("echoed: %ld\n", virtio_submit(&d, 0));
}
