#include "guest.h"

/* PIN_CR and PIN_MSR from the guest: pin, attack, check. */
#define EINVAL 22
#define CR0_WP (1UL << 16)
#define CR4_SMEP (1UL << 20)
#define CR4_SMAP (1UL << 21)
#define MSR_LSTAR 0xc0000082
#define MSR_SYSENTER_EIP 0x176

static int failures;
static void expect(const char *what, s64 got, s64 want) {
    if (got == want) printf("ok %s\n", what);
    else { printf("FAIL %s: got %ld want %ld\n", what, got, want); failures++; }
}

/* Long enough for several CR check intervals (10 ms each). */
static void wait_a_while(void) { for (volatile u32 i = 0; i < 20000; i++) cpu_relax(); }

static volatile int ap_phase;
static volatile u64 ap_lstar, ap_cr0;

void ap_main(unsigned cpu) {
    if (cpu != 1) return;
    while (ap_phase != 1) cpu_relax();
    /* Pins are per vCPU: nothing is pinned here. */
    ap_lstar = try_wrmsr(MSR_LSTAR, 0xffffffff81000000UL) == 0 ? rdmsr(MSR_LSTAR) : 0;
    write_cr0(read_cr0() & ~CR0_WP);
    wait_a_while();
    ap_cr0 = read_cr0();
    write_cr0(read_cr0() | CR0_WP);
    ap_phase = 2;
}

void guest_main(void) {
    u32 r[4];
    cpuid(7, 0, r);
    int smep = (r[1] >> 7) & 1, smap = (r[1] >> 20) & 1;
    printf("cpu smep=%d smap=%d\n", smep, smap);

    expect("PIN_CR bad register", heki_call(HEKI_PIN_CR, 3, CR0_WP, 0), -EINVAL);
    expect("PIN_CR empty mask", heki_call(HEKI_PIN_CR, 0, 0, 0), -EINVAL);
    expect("PIN_CR unpinnable bit", heki_call(HEKI_PIN_CR, 0, 1, 0), -EINVAL);
    expect("PIN_MSR unpinnable", heki_call(HEKI_PIN_MSR, 0x10, 0, 0), -EINVAL);

    /* CR0.WP */
    expect("PIN_CR WP", heki_call(HEKI_PIN_CR, 0, CR0_WP, 0), 0);
    write_cr0(read_cr0() & ~CR0_WP);
    wait_a_while();
    expect("WP restored", (read_cr0() & CR0_WP) != 0, 1);

    /* CR4.SMEP / SMAP, where the CPU has them. */
    if (smep && smap) {
        expect("PIN_CR SMAP not set yet", heki_call(HEKI_PIN_CR, 4, CR4_SMAP, 0), -EINVAL);
        use_supervisor_page_tables();
        write_cr4(read_cr4() | CR4_SMEP | CR4_SMAP);
        expect("PIN_CR SMEP|SMAP", heki_call(HEKI_PIN_CR, 4, CR4_SMEP | CR4_SMAP, 0), 0);
        write_cr4(read_cr4() & ~(CR4_SMEP | CR4_SMAP));
        wait_a_while();
        expect("SMEP and SMAP restored", (read_cr4() & (CR4_SMEP | CR4_SMAP)) == (CR4_SMEP | CR4_SMAP), 1);
    } else {
        puts("skip smep/smap: not in guest CPUID\n");
    }

    /* LSTAR */
    wrmsr(MSR_LSTAR, 0xffffffff80001000UL);
    expect("PIN_MSR LSTAR", heki_call(HEKI_PIN_MSR, MSR_LSTAR, 0, 0), 0);
    expect("hooking LSTAR faults", try_wrmsr(MSR_LSTAR, 0xdeadbeef000UL), 13);
    expect("LSTAR unchanged", rdmsr(MSR_LSTAR) == 0xffffffff80001000UL, 1);
    expect("writing the pinned value is fine", try_wrmsr(MSR_LSTAR, 0xffffffff80001000UL), 0);
    expect("unpinned MSR unaffected", try_wrmsr(MSR_SYSENTER_EIP, 0x1234), 0);
    expect("unpinned MSR written", rdmsr(MSR_SYSENTER_EIP), 0x1234);

    /* Another vCPU has no pins. */
    unsigned n = smp_start_async();
    if (n > 1) {
        ap_phase = 1;
        while (ap_phase != 2) cpu_relax();
        expect("other vCPU may write LSTAR", ap_lstar == 0xffffffff81000000UL, 1);
        expect("other vCPU may clear WP", (ap_cr0 & CR0_WP) == 0, 1);
    }
    printf("heki pins done failures=%d\n", failures);
}
