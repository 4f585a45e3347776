#include "guest.h"

/* Driven by an introspection agent in the test: the guest announces its
 * addresses, then waits at each step until the agent writes the step number
 * into the mailbox (through write-memory), and prints what its accesses did. */
#define MSR_SYSENTER_ESP 0x175

static u8 watched[4096] ALIGNED_PAGE;
static u8 locked[4096] ALIGNED_PAGE;
static volatile u64 mailbox[512] ALIGNED_PAGE;
static u8 secret[4096] ALIGNED_PAGE = {0x5e};

/* Waits for a byte on COM1 (the host's stdin with --serial tty). */
static void wait_serial_byte(void) {
    while (!(inb(0x3f8 + 5) & 1)) cpu_relax();
    (void)inb(0x3f8);
}

static void step(u64 n) {
    printf("step %lu\n", n);
    while (mailbox[0] < n) cpu_relax();
}

#define BENCH_ROUNDS 5
#define BENCH_N 400
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u64 peek(const void *p) { return *(volatile const u64 *)p; }

/* A hardware-breakpoint target: its address is in the ready line. */
static volatile u64 bp_hits;
static void __attribute__((noinline)) bp_target(void) { bp_hits++; }

/* "smp": both vCPUs write the watched page at the same moment, round after
 * round, so two events wait for replies at once. */
#define SMP_ROUNDS 20
static volatile u32 smp_arrived[2];
static volatile unsigned smp_cpus = 1;

static void smp_rounds(unsigned cpu) {
    for (u32 r = 1; r <= SMP_ROUNDS; r++) {
        smp_arrived[cpu] = r;
        for (unsigned c = 0; c < smp_cpus; c++)
            while (smp_arrived[c] < r) cpu_relax();
        *(volatile u64 *)(watched + 64 * cpu) = r;
    }
}

void ap_main(unsigned cpu) {
    if (cpu == 1) smp_rounds(1);
}

void guest_main(void) {
    printf("ready watched=%lx mailbox=%lx locked=%lx bp=%lx\n", (u64)watched, (u64)mailbox, (u64)locked,
           (u64)bp_target);
    if (cmdline_has("idt")) {
        /* A rootkit's move: hook #BP in the IDT and change a data page. */
        struct __attribute__((packed)) { u16 limit; u64 base; } idtr;
        __asm__ volatile("sidt %0" : "=m"(idtr));
        printf("idt base=%lx limit=%x data=%lx\n", idtr.base, (u32)idtr.limit, (u64)secret);
        wait_serial_byte();
        volatile u64 *gate = (volatile u64 *)(idtr.base + 3 * 16);
        u64 before = gate[0];
        gate[0] = 0xdeadbeefUL;
        u64 after = gate[0];
        *(volatile u64 *)secret = 0x4141;
        printf("idt-attack gate=%s data=%s\n", after == before ? "intact" : "overwritten",
               peek(secret) == 0x4141 ? "overwritten" : "intact");
        return;
    }
    if (cmdline_has("cli")) {
        /* Writes watched[0] until mailbox[0] reaches 9, reading each write back. */
        u64 v = 0;
        while (mailbox[0] < 9) {
            v++;
            *(volatile u64 *)watched = v;
            if (peek(watched) != v) printf("denied v=%lx\n", v);
            for (int i = 0; i < 1000; i++) cpu_relax();
        }
        printf("cli done\n");
        return;
    }
    if (cmdline_has("regs")) {
        /* Spins until the agent sets RAX to 0x5a5a; mailbox[1] says the loop has started. */
        u64 rax, rbx = 0x77;
        __asm__ volatile("xor %%eax, %%eax\n\t"
                         "movq $1, %[flag]\n\t"
                         "1: pause\n\t"
                         "cmp $0x5a5a, %%rax\n\t"
                         "jne 1b"
                         : "=&a"(rax), "+b"(rbx), [flag] "=m"(mailbox[1])
                         :
                         : "memory");
        printf("regs rax=%lx rbx=%lx\n", rax, rbx);
        /* The agent injects an exception here: the handler prints it and powers off. */
        step(2);
        printf("no exception\n");
        return;
    }
    if (cmdline_has("hypercall")) {
        step(1);
        s64 first = heki_call(HEKI_VERSION, 0x11, 0x22, 0x33);
        s64 second = heki_call(HEKI_VERSION, 0x11, 0x22, 0x33);
        printf("hypercall first=%ld second=%ld\n", first, second);
        return;
    }
    if (cmdline_has("cr")) {
        step(1);
        /* No exit between the agent's track-cr and this change: the baseline
         * must be the one taken when tracking started. */
        u64 cr4 = read_cr4();
        write_cr4(cr4 ^ (1UL << 2)); /* CR4.TSD: harmless here */
        printf("cr toggled\n");
        write_cr4(cr4);
        printf("cr restored cr4=%lx\n", cr4);
        step(2);
        return;
    }
    if (cmdline_has("bp")) {
        step(1);
        bp_target();
        bp_target();
        printf("bp first=%lu\n", bp_hits);
        step(2);
        bp_target();
        printf("bp done hits=%lu\n", bp_hits);
        return;
    }
    if (cmdline_has("smp")) {
        step(1);
        unsigned n = smp_start_async();
        smp_cpus = n > 2 ? 2 : n;
        smp_rounds(0);
        while (smp_arrived[smp_cpus - 1] < SMP_ROUNDS || peek(watched + 64) < SMP_ROUNDS) cpu_relax();
        printf("smp done cpus=%u a=%lu b=%lu\n", smp_cpus, peek(watched), peek(watched + 64));
        step(2);
        return;
    }
    if (cmdline_has("bench")) {
        /* A tracked write answered `continue` against a plain MMIO exit, in one
         * run: BENCH_ROUNDS interleaved rounds, so a busy host spoils one round
         * rather than one side. */
        step(1);
        for (int round = 0; round < BENCH_ROUNDS; round++) {
            u64 t = rdtsc();
            for (int i = 0; i < BENCH_N; i++) *(volatile u8 *)0xd0000000UL = 1;
            u64 mmio = (rdtsc() - t) / BENCH_N;
            t = rdtsc();
            for (int i = 0; i < BENCH_N; i++) *(volatile u8 *)(watched + (i & 0xfff)) = 1;
            u64 tracked = (rdtsc() - t) / BENCH_N;
            printf("bench round=%d mmio_exit=%lu tracked_write_continue=%lu\n", round, mmio, tracked);
        }
        printf("bench done\n");
        return;
    }
    if (cmdline_has("private")) {
        /* All RAM private but the mailbox (the agent steps the guest through it). */
        s64 on = heki_call(HEKI_PRIVATE_MEMORY, 1, 0, 0);
        s64 shared = heki_call(HEKI_SET_SHARED, (u64)mailbox, 4096, 1);
        printf("private on=%ld shared=%ld\n", on, shared);
        step(1);
        *(volatile u64 *)watched = 0x5ec7e75ec7e7UL;
        printf("private written=%lx\n", peek(watched));
        step(2);
        return;
    }
    if (cmdline_has("heki")) {
        s64 rc = heki_protect((u64)locked, (u64)locked + 4096, HEKI_READ);
        printf("protect rc=%ld\n", rc);
        step(1);
        *(volatile u64 *)locked = 0x4444;
        *(volatile u64 *)watched = 0x5555;
        printf("locked=%lx watched=%lx\n", peek(locked), peek(watched));
        return;
    }
    step(1);
    *(volatile u64 *)(watched + 0) = 0x1111;
    *(volatile u64 *)(watched + 8) = 0x2222;
    *(volatile u64 *)(watched + 16) = 0x3333;
    printf("writes a=%lx b=%lx c=%lx\n", peek(watched), peek(watched + 8), peek(watched + 16));
    step(2);
    int first = try_wrmsr(MSR_SYSENTER_ESP, 0x1234);
    int second = try_wrmsr(MSR_SYSENTER_ESP, 0x5678);
    printf("msr first=%d second=%d value=%lx\n", first, second, rdmsr(MSR_SYSENTER_ESP));
    step(3);
    printf("done\n");
}
