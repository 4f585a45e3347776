#include "guest.h"

/* Rounds of forbidden writes made at the same moment by every vCPU (a
 * barrier releases them together), for policy `pause`: the host resumes the
 * VM each time heki pauses it, and the guest must get to the end.
 * "single": only the boot vCPU writes, for more rounds, each at a different
 * moment after the VM was resumed.
 * After "all rounds done" the guest halts and the VM stays up. */
static u32 ROUNDS = 12;

static u8 page[4096] ALIGNED_PAGE;
static volatile u32 arrived[2], wrote[2];
static volatile unsigned cpus = 1;
static int jitter;

static u64 tsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void rounds(unsigned cpu) {
    for (u32 r = 1; r <= ROUNDS; r++) {
        arrived[cpu] = r;
        for (unsigned c = 0; c < cpus; c++)
            while (arrived[c] < r) cpu_relax();
        if (jitter) {
            /* Trap at a different moment after each resume: from at once to
             * about 14 ms later, so that on a loaded host too some of the
             * host's racing vm.pause requests land before the trap and some
             * after it. */
            u64 end = tsc() + (u64)(r * 7919 % 61) * 600000;
            while (tsc() < end) cpu_relax();
        }
        *(volatile u8 *)(page + 64 * cpu) = (u8)r; /* traps: the page is locked */
        wrote[cpu] = r;
        if (cpu == 0) {
            for (unsigned c = 0; c < cpus; c++)
                while (wrote[c] < r) cpu_relax();
            printf("round %u\n", r);
        }
    }
}

void ap_main(unsigned cpu) {
    if (cpu == 1) rounds(1);
}

void guest_main(void) {
    printf("protect rc=%ld\n", heki_protect((u64)page, (u64)page + 4096, HEKI_READ));
    if (cmdline_has("single")) {
        ROUNDS = 80;
        jitter = 1;
    } else {
        /* The AP waits at the first barrier until cpus is known. */
        unsigned n = smp_start_async();
        cpus = n > 2 ? 2 : n;
    }
    printf("writers=%u\n", cpus);
    rounds(0);
    printf("all rounds done page=%x,%x\n", page[0], page[64]);
    for (;;) __asm__ volatile("cli; hlt");
}
