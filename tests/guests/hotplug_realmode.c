#include "guest.h"

/* vCPU 0 pins CR0.WP; when the host adds vCPU 1, the guest starts it on a
 * real-mode loop that never enters long mode (so never sets WP): with no
 * paging, every page the page tables would protect is writable to it. */
#define CR0_WP (1UL << 16)
#define CPU_PORT 0xcd8
#define LAPIC_BASE 0xfee00000UL
#define REALMODE_BASE 0x20000UL

static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }
static u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static void delay(u32 loops) { for (volatile u32 i = 0; i < loops; i++) cpu_relax(); }

void guest_main(void) {
    printf("pin WP rc=%ld\n", heki_call(HEKI_PIN_CR, 0, CR0_WP, 0));
    /* Real mode at 0x2000:0: "1: mov $0x52, %al; out %al, $0x80; jmp 1b". */
    static const u8 loop[] = {0xb0, 0x52, 0xe6, 0x80, 0xeb, 0xfa};
    memcpy((void *)REALMODE_BASE, loop, sizeof(loop));
    puts("waiting for vCPU 1\n");
    for (;;) {
        outl(CPU_PORT, 1);
        if (inl(CPU_PORT + 4) & 2) break;
        cpu_relax();
    }
    outl(CPU_PORT + 4, 2);
    lapic_write(0xf0, lapic_read(0xf0) | 0x100);
    lapic_write(0x310, 1u << 24);
    lapic_write(0x300, 0x00004500); /* INIT to APIC ID 1 */
    delay(100);
    for (int i = 0; i < 2; i++) {
        lapic_write(0x310, 1u << 24);
        lapic_write(0x300, 0x00004600 | (REALMODE_BASE >> 12)); /* SIPI */
        delay(100);
    }
    puts("vCPU 1 started in real mode\n");
    for (;;) cpu_relax();
}
