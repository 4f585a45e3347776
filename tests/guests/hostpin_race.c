#include "guest.h"

/* The guest races a host-side pin (vm.heki-pin) by rewriting the register
 * it pins, over and over.
 *  "msr": every vCPU cycles its LSTAR through 16 values with try_wrmsr;
 *         the first refused write means the pin is in force: the vCPU
 *         reports its live value and stops.
 *  "cr4": toggles a pinnable CR4 bit it can toggle (FSGSBASE, else UMIP)
 *         until the host locks the mailbox page (its signal that the pin
 *         returned), then stops touching CR4 and reports whether the bit
 *         is set and stays set. */
#define MSR_LSTAR 0xc0000082
#define CR4_UMIP (1UL << 11)
#define CR4_FSGSBASE (1UL << 16)

static u8 mailbox[4096] ALIGNED_PAGE;

static u64 tsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void halt_forever(void) { for (;;) __asm__ volatile("cli; hlt"); }

/* Each vCPU cycles its own LSTAR through 16 values, so that any write that
 * slips in after the host read the value to pin shows up as a difference. */
#define LSTAR_VALUES 16
static volatile u32 msr_done[2];
/* The runtime's exception fix-up is not per CPU: one try_wrmsr at a time. */
static volatile u32 try_lock;

static int locked_try_wrmsr(u32 msr, u64 v) {
    while (__atomic_exchange_n(&try_lock, 1, __ATOMIC_ACQUIRE)) cpu_relax();
    int fault = try_wrmsr(msr, v);
    __atomic_store_n(&try_lock, 0, __ATOMIC_RELEASE);
    return fault;
}

static void msr_race_on(unsigned cpu) {
    u64 base = 0xffffffff81000000UL + ((u64)cpu << 24);
    wrmsr(MSR_LSTAR, base);
    u64 last_accepted = base;
    for (u64 i = 1;; i++) {
        u64 v = base + (i % LSTAR_VALUES) * 0x1000;
        if (locked_try_wrmsr(MSR_LSTAR, v)) {
            u64 live = rdmsr(MSR_LSTAR);
            printf("cpu=%u first refused write after %lu writes: refused=%lx last_accepted=%lx live=%lx\n", cpu, i,
                   v, last_accepted, live);
            break;
        }
        last_accepted = v;
    }
    msr_done[cpu] = 1;
}

void ap_main(unsigned cpu) {
    if (cpu == 1 && cmdline_has("msr")) msr_race_on(cpu);
}

static void msr_race(void) {
    unsigned cpus = smp_start_async();
    printf("toggling lstar on %u cpus\n", cpus);
    msr_race_on(0);
    while (cpus > 1 && !msr_done[1]) cpu_relax();
    puts("msr race done\n");
}

static void cr4_race(void) {
    u32 r[4];
    cpuid(7, 0, r);
    u64 cr4 = read_cr4(), bit = 0;
    if ((r[1] & 1) && !try_write_cr4(cr4 | CR4_FSGSBASE) && !try_write_cr4(cr4)) bit = CR4_FSGSBASE;
    else if ((r[2] & 4) && !try_write_cr4(cr4 | CR4_UMIP) && !try_write_cr4(cr4)) bit = CR4_UMIP;
    printf("cpuid7 ebx=%x ecx=%x\n", r[1], r[2]);
    if (!bit) { puts("no toggleable pinnable cr4 bit\n"); return; }
    printf("mailbox=%p\n", (u64)mailbox);
    printf("toggling cr4 bit=%lx\n", bit);
    u64 toggles = 0;
    /* Mostly set, briefly clear (the host pins while the bit is set); the
     * mailbox is looked at (an exit) only every 8 toggles. */
    while ((toggles & 7) || heki_call(HEKI_QUERY, (u64)mailbox, 0, 0) == 7) {
        write_cr4(cr4 | bit);
        for (volatile u32 i = 0; i < 200; i++) cpu_relax();
        write_cr4(cr4 & ~bit);
        for (volatile u32 i = 0; i < 10; i++) cpu_relax();
        toggles++;
    }
    /* Pinned: the guest no longer touches CR4. Its last write cleared the bit; a
     * pinned bit is set again within the check interval. */
    u64 t0 = tsc();
    u32 spins = 0;
    while (!(read_cr4() & bit) && spins < 50000000u) { cpu_relax(); spins++; }
    u64 restored_after = tsc() - t0;
    int set = (read_cr4() & bit) != 0;
    u32 cleared = 0;
    /* Reading CR4 exits on some hosts: a modest number of samples. */
    for (u32 i = 0; i < 20000u; i++) cleared += !(read_cr4() & bit);
    printf("cr4 after pin: toggles=%lu set=%d restored after tsc=%lu samples clear afterwards=%u\n", toggles, set,
           restored_after, cleared);
    puts("cr4 race done\n");
}

void guest_main(void) {
    if (cmdline_has("cr4")) cr4_race();
    else msr_race();
    halt_forever();
}
