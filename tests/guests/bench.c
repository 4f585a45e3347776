#include "guest.h"

/* Exit-path micro-benchmarks, timed with the TSC inside the guest. Only the
 * ratios between lines matter on a host that emulates guest code. */
#define N 2000
/* String instructions over the whole locked page: fewer, each far longer. */
#define N_STRING 10
#define MSR_LSTAR 0xc0000082
#define MSR_SYSENTER_ESP 0x175

static u8 locked[4096] ALIGNED_PAGE;
static u8 bytes_page[4096] ALIGNED_PAGE;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void report_n(const char *name, u64 start, u64 n) {
    printf("bench %s cycles_per_op=%lu\n", name, (rdtsc() - start) / n);
}

static void report(const char *name, u64 start) { report_n(name, start, N); }

void guest_main(void) {
    u64 t;
    if (cmdline_has("compute")) {
        /* A busy loop with (or without) a CR pin: how much do the periodic checks cost? */
        if (cmdline_has("pin")) heki_call(HEKI_PIN_CR, 0, 1UL << 16, 0);
        t = rdtsc();
        for (volatile u64 i = 0; i < 200000; i++) {}
        printf("bench compute cycles=%lu\n", rdtsc() - t);
        return;
    }
    heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ);
    heki_call(HEKI_PROTECT_BYTES, (u64)bytes_page, 1, 0);
    wrmsr(MSR_LSTAR, 0xffffffff80001000UL);
    heki_call(HEKI_PIN_MSR, MSR_LSTAR, 0, 0);

    t = rdtsc();
    for (int i = 0; i < N; i++) outb(0x80, 0);
    report("pio_exit", t);
    t = rdtsc();
    for (int i = 0; i < N; i++) *(volatile u8 *)0xd0000000UL = 1;
    report("mmio_exit", t);
    t = rdtsc();
    for (int i = 0; i < N; i++) *(volatile u8 *)(locked + (i & 0xfff)) = 1;
    report("denied_write", t);
    t = rdtsc();
    for (int i = 0; i < N_STRING; i++) {
        void *d = locked;
        u64 n = 4096;
        __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(0) : "memory");
    }
    report_n("denied_rep_stosb_page", t, N_STRING);
    t = rdtsc();
    for (int i = 0; i < N_STRING; i++) {
        void *d = locked;
        u64 n = 512;
        __asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(0) : "memory");
    }
    report_n("denied_rep_stosq_page", t, N_STRING);
    t = rdtsc();
    for (int i = 0; i < N; i++) *(volatile u8 *)(bytes_page + 8 + (i & 0xff)) = 1;
    report("byte_neighbour_write", t);
    t = rdtsc();
    for (int i = 0; i < N; i++) wrmsr(MSR_SYSENTER_ESP, i);
    report("msr_write_unintercepted", t);
    t = rdtsc();
    for (int i = 0; i < N; i++) wrmsr(MSR_LSTAR, 0xffffffff80001000UL);
    report("msr_write_pinned", t);
}
