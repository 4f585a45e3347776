#include "guest.h"

/* vCPU 1 ejects itself the moment the host asks, from inside the guest,
 * while vCPU 0 hammers the same registers with ejects of its own. */
#define CPU_PORT 0xcd8

static volatile int ap_running;

void ap_main(unsigned cpu) {
    if (cpu != 1) return;
    ap_running = 1;
    for (;;) {
        outl(CPU_PORT, 1);
        if (inl(CPU_PORT + 4) & 4) {
            outl(CPU_PORT + 4, 8);
            for (;;) cpu_relax();
        }
    }
}

void guest_main(void) {
    smp_start_async();
    while (!ap_running) cpu_relax();
    puts("vCPU 1 runs\n");
    for (;;) {
        outl(CPU_PORT, 0);
        outl(CPU_PORT + 4, 8);
        outl(CPU_PORT, 1);
        outl(CPU_PORT + 4, 8);
        outl(CPU_PORT, 0xffffffffu);
        outl(CPU_PORT + 4, 0xffffffffu);
    }
}
