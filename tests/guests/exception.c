#include "guest.h"

/* An undefined instruction with no fixup: the runtime reports it and powers off. */
void guest_main(void) {
    puts("about to ud2\n");
    __asm__ volatile("ud2");
    puts("not reached\n");
}
