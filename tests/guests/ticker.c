#include "guest.h"

/* Prints a numbered tick forever (the API tests pause and resume it). */
void guest_main(void) {
    for (u64 n = 0;; n++) {
        printf("tick %lu\n", n);
        for (volatile u32 i = 0; i < 2000; i++) cpu_relax();
    }
}
