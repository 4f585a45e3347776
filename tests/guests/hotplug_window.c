#include "virtio.h"

/* The guest's own accesses to the hotplug window: before the plug (no RAM
 * there: the VMM must live on), after it (RAM, fresh), and a heki lock on
 * plugged memory against the guest's own write and a device's DMA. */
#define MEM_PORT 0xce0
#define WINDOW 0x100000000UL

extern u64 pml4[];
static u64 pd4[512] ALIGNED_PAGE;
static struct virtq_page queue ALIGNED_PAGE;

static u32 mem_status(u32 slot) { outl(MEM_PORT, slot); return inl(MEM_PORT + 4); }

void guest_main(void) {
    /* Map [4 GiB, 5 GiB) with 2 MiB pages: a fifth PDPT entry. */
    for (u64 i = 0; i < 512; i++) pd4[i] = (WINDOW + (i << 21)) | 0x83;
    u64 *pdpt = (u64 *)(pml4[0] & ~0xfffUL);
    pdpt[4] = (u64)pd4 | 0x3;
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");

    volatile u64 *w = (volatile u64 *)WINDOW;
    w[0] = 0x5a5a5a5a5a5a5a5aUL;
    w[512 * 8] = 1; /* another page */
    printf("before the plug: read=%lx\n", w[0]);

    struct virtio_dev d = {0};
    if (virtio_find(0x1044, &d, &queue)) { puts("no virtio-rng\n"); return; }
    virtio_start(&d);
    puts("waiting for memory\n");
    while (!(mem_status(0) & 1)) cpu_relax();
    printf("after the plug: read=%lx\n", w[0]);
    w[1] = 0x1122334455667788UL;
    printf("written: read=%lx\n", w[1]);

    u64 locked = WINDOW + 0x3000;
    *(volatile u64 *)locked = 0x77;
    printf("protect rc=%ld\n", heki_protect(locked, locked + 4096, HEKI_READ));
    *(volatile u64 *)locked = 0x99;
    printf("locked after a write: %lx\n", *(volatile u64 *)locked);
    s64 len = virtio_read_into(&d, (void *)locked, 16);
    printf("dma into locked: len=%ld value=%lx\n", len, *(volatile u64 *)locked);
    len = virtio_read_into(&d, (void *)(WINDOW + 0x5000), 16);
    printf("dma into plugged: len=%ld\n", len);
    puts("window done\n");
    for (;;) cpu_relax();
}
