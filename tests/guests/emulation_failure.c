#include "guest.h"

/* cmpxchg16b cannot be emulated by this host's KVM: the VMM must report the
 * failure with the guest RIP and instruction bytes, and exit non-zero. */
static u64 target[2] __attribute__((aligned(16)));

void guest_main(void) {
    puts("about to cmpxchg16b\n");
    u64 lo = 0, hi = 0;
    __asm__ volatile("lock cmpxchg16b %0" : "+m"(*(volatile u64(*)[2])target), "+a"(lo), "+d"(hi)
                     : "b"(1UL), "c"(2UL) : "memory");
    puts("cmpxchg16b returned\n");
}
