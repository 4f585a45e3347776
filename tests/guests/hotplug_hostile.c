#include "virtio.h"

/* A hostile guest against the hotplug controllers (ports 0xcd8 and 0xce0)
 * and the hotplug memory window: garbage at every width and offset, ejects
 * nobody asked for, DMA into the unplugged window and across its edge. */
#define CPU_PORT 0xcd8
#define MEM_PORT 0xce0
#define WINDOW 0x100000000UL
#define SLOT (128UL << 20)

static struct virtq_page queue ALIGNED_PAGE;
static u8 buffer[4096] ALIGNED_PAGE;

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static u32 status(u16 base, u32 slot) { outl(base, slot); return inl(base + 4); }

static void hammer(u16 base) {
    static const u32 values[] = {0, 1, 2, 4, 8, 0xf, 0xffffffffu, 0x80000000u};
    for (u16 off = 0; off < 8; off++)
        for (int v = 0; v < 8; v++) {
            outb(base + off, (u8)values[v]); (void)inb(base + off);
            outw(base + off, (u16)values[v]); (void)inw(base + off);
            outl(base + off, values[v]); (void)inl(base + off);
        }
    static const u32 selects[] = {0, 1, 2, 3, 64, 127, 128, 255, 256, 0x7fffffffu, 0xffffffffu};
    for (int s = 0; s < 11; s++) {
        outl(base, selects[s]);
        outl(base + 4, 0xffffffffu); /* ack, remove, eject at once */
        outl(base + 4, 8);           /* eject */
        outl(base + 4, 4);
        (void)inl(base + 4);
    }
}

static s64 rng_at(struct virtio_dev *d, u64 gpa, u32 len) {
    d->q->desc[0] = (struct virtq_desc){ gpa, len, VIRTQ_DESC_F_WRITE, 0 };
    return virtio_submit(d, 0);
}

void guest_main(void) {
    hammer(CPU_PORT);
    hammer(MEM_PORT);
    printf("after hammering: cpu0=%x cpu1=%x mem0=%x\n", status(CPU_PORT, 0), status(CPU_PORT, 1),
           status(MEM_PORT, 0));

    struct virtio_dev d = {0};
    if (virtio_find(0x1044, &d, &queue)) { puts("no virtio-rng\n"); return; }
    printf("status=%x\n", virtio_start(&d));
    printf("unplugged: len=%ld\n", rng_at(&d, WINDOW, 16));
    printf("below the window: len=%ld\n", rng_at(&d, WINDOW - 8, 16));
    printf("normal: len=%ld\n", rng_at(&d, (u64)buffer, 16));

    puts("waiting for memory\n");
    while (!(status(MEM_PORT, 0) & 1)) cpu_relax();
    outl(MEM_PORT + 4, 2);
    printf("plugged: mem0=%x mem1=%x\n", status(MEM_PORT, 0), status(MEM_PORT, 1));
    hammer(MEM_PORT);
    printf("after hammering plugged: mem0=%x mem1=%x\n", status(MEM_PORT, 0), status(MEM_PORT, 1));
    printf("into plugged: len=%ld\n", rng_at(&d, WINDOW + 0x1000, 16));
    printf("straddling the plugged end: len=%ld\n", rng_at(&d, WINDOW + SLOT - 8, 16));
    printf("past the plugged end: len=%ld\n", rng_at(&d, WINDOW + SLOT, 16));
    /* The rings themselves in the unplugged part. */
    virtio_negotiate(&d);
    u8 st = virtio_enable_queue(&d, VIRTQ_SIZE, WINDOW + SLOT, WINDOW + SLOT + 0x1000, WINDOW + SLOT + 0x2000, 0);
    *(volatile u16 *)(d.notify) = 0;
    for (int i = 0; i < 100000; i++) cpu_relax();
    printf("rings unplugged: needs_reset=%d\n", ((st | COMMON8(&d, 0x14)) & 0x40) != 0);
    d.q = &queue;
    d.avail_idx = d.used_seen = 0;
    printf("restarted: status=%x\n", virtio_start(&d));
    printf("after restart: len=%ld\n", rng_at(&d, (u64)buffer, 16));

    /* An eject the host asked for, answered; then unasked ones again. */
    puts("waiting for a removal\n");
    while (!(status(CPU_PORT, 1) & 4)) cpu_relax();
    outl(CPU_PORT + 4, 4);
    outl(CPU_PORT + 4, 8);
    outl(CPU_PORT + 4, 8);
    outl(CPU_PORT, 0);
    outl(CPU_PORT + 4, 8);
    printf("ejected: cpu0=%x cpu1=%x\n", status(CPU_PORT, 0), status(CPU_PORT, 1));
    hammer(CPU_PORT);
    puts("hostile done\n");
    for (;;) cpu_relax();
}
