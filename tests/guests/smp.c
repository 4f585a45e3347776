#include "guest.h"

void ap_main(unsigned cpu) {
    printf("cpu %u checked in\n", cpu);
}

void guest_main(void) {
    unsigned n = smp_start();
    printf("all %u cpus checked in\n", n);
}
