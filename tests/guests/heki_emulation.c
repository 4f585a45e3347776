#include "guest.h"

/* cmpxchg16b cannot be emulated by this host's KVM. Aimed at a locked page it
 * is a heki violation: the VMM skips it and the guest goes on. */
static u64 locked[512] ALIGNED_PAGE = {0x1111, 0x2222};

void guest_main(void) {
    printf("protect rc=%ld\n", heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ));
    u64 lo = 0x1111, hi = 0x2222;
    __asm__ volatile("lock cmpxchg16b %0" : "+m"(*(volatile u64(*)[2])locked), "+a"(lo), "+d"(hi)
                     : "b"(0xdeadUL), "c"(0xbeefUL) : "memory");
    printf("survived: memory=%lx,%lx\n", *(volatile u64 *)&locked[0], *(volatile u64 *)&locked[1]);
}
