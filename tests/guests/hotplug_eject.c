#include "guest.h"

/* Gives vCPU 1 back whenever the host asks (ACPI's _EJ0, without ACPI),
 * and says each time what slot 1's status becomes. */
#define CPU_PORT 0xcd8

void guest_main(void) {
    puts("ready to eject\n");
    u32 last = 1;
    for (;;) {
        outl(CPU_PORT, 1);
        u32 now = inl(CPU_PORT + 4);
        if (now & 4) {
            outl(CPU_PORT + 4, 4);
            outl(CPU_PORT + 4, 8);
            puts("ejected vCPU 1\n");
        } else if (now & 2) {
            outl(CPU_PORT + 4, 2);
        }
        if ((now & 1) != last) {
            printf("slot 1 enabled=%u\n", now & 1);
            last = now & 1;
        }
        for (volatile int i = 0; i < 1000; i++) cpu_relax();
    }
}
