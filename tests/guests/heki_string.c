#include "guest.h"

/* String instructions over locked memory. Each case runs twice: once on
 * plain pages (the reference: what the CPU computes), once on pages where
 * heki locks the middle one. The registers after must match; the bytes must
 * match outside the locked bytes, and inside them stay as they were (deny)
 * or match too (log). Prints "ok NAME" or "FAIL NAME ...", then "string done". */

#define PAGE 4096UL
/* Pages: [0] writable, [1] locked, [2] writable. */
static u8 tgt[3 * PAGE] ALIGNED_PAGE;
static u8 ref[3 * PAGE] ALIGNED_PAGE;
/* The same, with only two protected bytes in the middle page. */
static u8 tgt_bytes[3 * PAGE] ALIGNED_PAGE;
#define PROTECTED_BYTE 100
static u8 src[PAGE] ALIGNED_PAGE;
static u8 before[3 * PAGE];
/* The instruction under test, then `ret`. */
static u8 code[32] ALIGNED_PAGE;
/* A 4 KiB page table for the last 2 MiB below 4 GiB (GVA 0xffe00000). */
static u64 window_pt[512] ALIGNED_PAGE;
#define WINDOW 0xffe00000UL
static int log_policy, failures;
extern u64 pml4[];

struct regs { u64 rcx, rdi, rsi, rflags; };

/* Runs code[] with these registers; a fault resumes at its `ret`. */
static struct regs run(u64 rcx, u64 rdi, u64 rsi, u64 rax, int df, unsigned len) {
    code[len] = 0xc3;
    fixup_rip = (u64)code + len;
    u64 flags;
    __asm__ volatile("test %[df], %[df]\n\tjz 1f\n\tstd\n1:\n\tcall *%[fn]\n\tpushfq\n\tpopq %[fl]\n\tcld"
                     : "+c"(rcx), "+D"(rdi), "+S"(rsi), [fl] "=r"(flags)
                     : "a"(rax), [fn] "r"(code), [df] "r"((u64)df)
                     : "memory", "cc", "rdx");
    fixup_rip = 0;
    return (struct regs){rcx, rdi, rsi, flags & (1UL << 10)};
}

static void reload_cr3(void) {
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/* Window page `i` shows guest-physical page `pa` (0: not present). */
static void window_map(unsigned i, u64 pa) {
    window_pt[i] = pa ? pa | 0x3 : 0;
    reload_cr3();
}

struct kind { const char *name; u8 bytes[4]; unsigned len; int movs; };
static const struct kind STOSB = {"stosb", {0xf3, 0xaa}, 2, 0};
static const struct kind STOSW = {"stosw", {0x66, 0xf3, 0xab}, 3, 0};
static const struct kind STOSD = {"stosd", {0xf3, 0xab}, 2, 0};
static const struct kind STOSQ = {"stosq", {0xf3, 0x48, 0xab}, 3, 0};
static const struct kind MOVSB = {"movsb", {0xf3, 0xa4}, 2, 1};
static const struct kind MOVSQ = {"movsq", {0xf3, 0x48, 0xa5}, 3, 1};
static const struct kind GS_MOVSB = {"gs movsb", {0x65, 0xf3, 0xa4}, 3, 1};
#define MSR_GS_BASE 0xc0000101
static const struct kind A32_STOSB = {"addr32 stosb", {0x67, 0xf3, 0xaa}, 3, 0};
static const struct kind A32_STOSD = {"addr32 stosd", {0x67, 0xf3, 0xab}, 3, 0};
static const struct kind STOSQ_NOREP = {"stosq", {0x48, 0xab}, 2, 0};
static const struct kind MOVSB_NOREP = {"movsb", {0xa4}, 1, 1};

/* Where the instruction writes: an offset into a buffer, or a window GVA. */
struct target { u64 dst_off; u64 window_page; u64 window_gva_off; };

static int protected_at(const u8 *buf, u64 i) {
    if (buf == tgt) return i >= PAGE && i < 2 * PAGE;
    return i == PAGE + PROTECTED_BYTE || i == PAGE + PROTECTED_BYTE + 1;
}

/* One case. `dst`: offset of RDI into the 3-page buffer, or with `window`
 * the GVA RDI holds while window page `wpage` shows the buffer's middle page. */
static void check(const char *name, const struct kind *k, u8 *buf, u64 dst, u64 rcx, u64 rsi, int df, int window,
                  unsigned wpage, u64 rdi_high) {
    memcpy(code, k->bytes, k->len);
    u64 fill = 0x0101010101010101UL * (u8)(0x20 + (strlen(name) & 0x3f));
    /* Same starting bytes on both sides; the locked bytes cannot be refilled, so the reference takes them. */
    for (u64 i = 0; i < 3 * PAGE; i++) {
        /* The middle page traps every write: it keeps what earlier cases left. */
        if (i < PAGE || i >= 2 * PAGE) buf[i] = (u8)fill;
        ref[i] = buf[i];
        before[i] = buf[i];
    }
    u64 rax = 0xa1b2c3d4e5f60718UL;
    u64 ref_rdi = window ? dst : (u64)ref + dst, tgt_rdi = window ? dst : (u64)buf + dst;
    /* A small RSI is an offset into the buffer (a source in the pages under test). */
    int rsi_rel = rsi < 3 * PAGE;
    u64 ref_rsi = rsi_rel ? (u64)ref + rsi : rsi, tgt_rsi = rsi_rel ? (u64)buf + rsi : rsi;
    if (window) window_map(wpage, (u64)ref + PAGE);
    struct regs want = run(rcx, ref_rdi | rdi_high, ref_rsi, rax, df, k->len);
    if (window) window_map(wpage, (u64)buf + PAGE);
    struct regs got = run(rcx, tgt_rdi | rdi_high, tgt_rsi, rax, df, k->len);
    if (window) window_map(wpage, 0);
    u64 delta = window ? 0 : (u64)buf - (u64)ref;
    int bad = 0;
    u64 rsi_delta = rsi_rel ? (u64)buf - (u64)ref : 0;
    if (got.rcx != want.rcx || got.rdi - delta != want.rdi || got.rsi - rsi_delta != want.rsi ||
        got.rflags != want.rflags) {
        printf("FAIL %s: registers rcx=%lx/%lx rdi=%lx/%lx rsi=%lx/%lx\n", name, got.rcx, want.rcx, got.rdi - delta,
               want.rdi, got.rsi - rsi_delta, want.rsi);
        bad = 1;
    }
    for (u64 i = 0; i < 3 * PAGE && !bad; i++) {
        u8 expect = protected_at(buf, i) && !log_policy ? before[i] : ref[i];
        if (buf[i] != expect) {
            printf("FAIL %s: byte %lx is %x, want %x (reference %x)\n", name, i, buf[i], expect, ref[i]);
            bad = 1;
        }
    }
    int changed = 0;
    for (u64 i = 0; i < 3 * PAGE; i++) changed += ref[i] != before[i];
    if (!changed) {
        printf("FAIL %s: the reference wrote nothing\n", name);
        bad = 1;
    }
    failures += bad;
    if (!bad) printf("ok %s\n", name);
}

void guest_main(void) {
    log_policy = cmdline_has("log");
    for (u64 i = 0; i < PAGE; i++) src[i] = (u8)(i * 7 + 3);
    /* The locked page keeps this under deny: varied, so copies within it show. */
    for (u64 i = 0; i < sizeof(tgt); i++) tgt[i] = (u8)(i * 13 + 5);
    memset(tgt_bytes, 0x11, sizeof(tgt_bytes));
    /* The window: PD entry 511 of the 3..4 GiB table points at window_pt. */
    u64 *pdpt = (u64 *)(pml4[0] & ~0xfffUL);
    u64 *pd3 = (u64 *)(pdpt[3] & ~0xfffUL);
    pd3[511] = (u64)window_pt | 0x3;
    reload_cr3();
    s64 rc = heki_protect((u64)tgt + PAGE, (u64)tgt + 2 * PAGE, HEKI_READ);
    s64 rc2 = heki_call(HEKI_PROTECT_BYTES, (u64)tgt_bytes + PAGE + PROTECTED_BYTE, 2, 0);
    printf("protect rc=%ld bytes rc=%ld\n", rc, rc2);

    /* A whole locked page, each width. */
    check("rep stosb page", &STOSB, tgt, PAGE, 4096, 0, 0, 0, 0, 0);
    check("rep stosw page", &STOSW, tgt, PAGE, 2048, 0, 0, 0, 0, 0);
    check("rep stosd page", &STOSD, tgt, PAGE, 1024, 0, 0, 0, 0, 0);
    check("rep stosq page", &STOSQ, tgt, PAGE, 512, 0, 0, 0, 0, 0);
    check("rep movsb page", &MOVSB, tgt, PAGE, 4096, (u64)src, 0, 0, 0, 0);
    check("rep movsq page", &MOVSQ, tgt, PAGE, 511, (u64)src + 8, 0, 0, 0, 0);
    /* Straddling: writable then locked, locked then writable, an element across the boundary. */
    check("rep stosb unlocked-locked", &STOSB, tgt, PAGE - 100, 200, 0, 0, 0, 0, 0);
    check("rep stosb locked-unlocked", &STOSB, tgt, 2 * PAGE - 100, 300, 0, 0, 0, 0, 0);
    check("rep stosq split element", &STOSQ, tgt, PAGE - 4, 10, 0, 0, 0, 0, 0);
    check("rep movsb unaligned source", &MOVSB, tgt, PAGE + 3, 3000, (u64)src + 1001, 0, 0, 0, 0);
    /* DF=1: down from the page above, through the locked page, into the page below. */
    check("rep stosb descending", &STOSB, tgt, 2 * PAGE + 99, PAGE + 200, 0, 1, 0, 0, 0);
    check("rep movsq descending", &MOVSQ, tgt, 2 * PAGE - 8, 512, (u64)src + PAGE - 8, 1, 0, 0, 0);
    /* A GS-relative source: the segment base counts. */
    wrmsr(MSR_GS_BASE, 0x1000);
    check("rep movsb gs source", &GS_MOVSB, tgt, PAGE, 4000, (u64)src + 16 - 0x1000, 0, 0, 0, 0);
    wrmsr(MSR_GS_BASE, 0);
    /* A movs whose source is the locked page itself (overlapping). */
    check("rep movsb overlapping", &MOVSB, tgt, PAGE + 1, 4000, PAGE, 0, 0, 0, 0);
    /* 32-bit address size: upper halves ignored and cleared, EDI wraps at 4 GiB. */
    check("addr32 rep stosd", &A32_STOSD, tgt, PAGE + 8, 0x1234000000000000UL | 1000, 0, 0, 0, 0, 0xdead00000000UL);
    check("addr32 rep stosb wrap", &A32_STOSB, tgt, 0xfffffff8UL, 16, 0, 0, 1, 511, 0);
    /* A count that never ends: the page after the locked one is not present, so it faults there. */
    check("rep stosb huge count", &STOSB, tgt, WINDOW + 10 * PAGE + 64, ~0UL, 0, 0, 1, 10, 0);
    /* Without REP: one element. */
    check("stosq", &STOSQ_NOREP, tgt, PAGE + 16, 1, 0, 0, 0, 0, 0);
    check("movsb", &MOVSB_NOREP, tgt, PAGE + 24, 1, (u64)src, 0, 0, 0, 0);
    /* A page with two protected bytes: everything else lands. */
    check("rep stosb protected bytes", &STOSB, tgt_bytes, PAGE, 4096, 0, 0, 0, 0, 0);
    if (cmdline_has("mmio-source")) {
        /* From an unclaimed MMIO address (reads as 0xff): element by element. */
        check("rep movsb mmio source", &MOVSB, tgt, PAGE + 64, 64, 0xd0000000UL, 0, 0, 0, 0);
    }
    printf("string done failures=%d\n", failures);
    if (cmdline_has("hold")) {
        for (;;) __asm__ volatile("cli; hlt");
    }
}
