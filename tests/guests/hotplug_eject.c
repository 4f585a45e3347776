#include "guest.h"

/* Gives vCPU 1 back whenever the host asks (ACPI's _EJ0, without ACPI). */
#define CPU_PORT 0xcd8

void guest_main(void) {
    puts("ready to eject\n");
    for (;;) {
        outl(CPU_PORT, 1);
        if (inl(CPU_PORT + 4) & 4) {
            outl(CPU_PORT + 4, 4);
            outl(CPU_PORT + 4, 8);
            puts("ejected vCPU 1\n");
        }
        for (volatile int i = 0; i < 1000; i++) cpu_relax();
    }
}
