#include "guest.h"

/* LOCK_MAPPINGS and PIN_DTR (ABI revision 1): a high kernel-style virtual
 * address is mapped through our own 4-level tables onto a locked page; then
 * the attacks of a rootkit that remaps instead of writing: change the PTE,
 * change the top-level entry, load a private CR3, load another IDT. */
#define EINVAL 22
#define EFAULT 14
#define EPERM 1
#define HEKI_LOCK_MAPPINGS 8
#define HEKI_PIN_DTR 9
#define EXPECT_READ_ONLY 1
#define EXPECT_NO_EXEC 2
#define HIGH_VA 0xffff800000000000UL /* PML4 slot 256 */
#define TOP_SLOT 256
#define P 1UL
#define RW 2UL

extern u64 pml4[];

static u64 pdpt_hi[512] ALIGNED_PAGE, pd_hi[512] ALIGNED_PAGE, pt_hi[512] ALIGNED_PAGE;
static volatile u64 locked_page[512] ALIGNED_PAGE;  /* what HIGH_VA must reach */
static volatile u64 evil_page[512] ALIGNED_PAGE;    /* the attacker's copy */
static volatile u64 unlocked_page[512] ALIGNED_PAGE;
/* The attacker's private paging structures. */
static u64 priv_pml4[512] ALIGNED_PAGE, priv_pdpt[512] ALIGNED_PAGE, priv_pd[512] ALIGNED_PAGE,
    priv_pt[512] ALIGNED_PAGE;
static u64 fake_idt[512] ALIGNED_PAGE;

static int failures;
static void expect(const char *what, s64 got, s64 want) {
    if (got == want) printf("ok %s\n", what);
    else { printf("FAIL %s: got %ld want %ld\n", what, got, want); failures++; }
}

static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void flush(void) { write_cr3(read_cr3()); }
static u64 high(unsigned i) { return *(volatile u64 *)(HIGH_VA + 8 * i); }

struct __attribute__((packed)) dtr { u16 limit; u64 base; };
static struct dtr sidt(void) { struct dtr d; __asm__ volatile("sidt %0" : "=m"(d)); return d; }

/* Reads HIGH_VA until it shows the locked value again, for up to ~1 s of
 * guest time (many check intervals). Returns the polls it took, or -1. */
static s64 polls_until_locked_value(void) {
    for (s64 i = 0; i < 400000; i++) {
        if (high(0) == 0x10c4ed) return i;
        cpu_relax();
    }
    return -1;
}

void guest_main(void) {
    locked_page[0] = 0x10c4ed;
    evil_page[0] = 0xe7e7;
    unlocked_page[0] = 0x0;
    pml4[TOP_SLOT] = (u64)pdpt_hi | P | RW;
    pdpt_hi[0] = (u64)pd_hi | P | RW;
    pd_hi[0] = (u64)pt_hi | P | RW;
    pt_hi[0] = (u64)locked_page | P;          /* read-only */
    pt_hi[1] = (u64)unlocked_page | P | RW;   /* writable, unlocked */
    pt_hi[2] = (u64)evil_page | P;            /* read-only but not locked */
    flush();
    expect("high VA reaches the locked page", high(0), 0x10c4ed);

    u32 r[4];
    cpuid(0x40000101, 0, r);
    printf("revision=%u lock_mappings=%u pin_dtr=%u\n", r[3], (r[1] >> 7) & 1, (r[1] >> 8) & 1);

    expect("lock the page", heki_protect((u64)locked_page, (u64)locked_page + PAGE_SIZE, HEKI_READ | HEKI_IMMUTABLE), 0);
    expect("unaligned", heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA + 8, PAGE_SIZE, EXPECT_READ_ONLY), -EINVAL);
    expect("empty", heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA, 0, EXPECT_READ_ONLY), -EINVAL);
    expect("unknown expectation", heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA, PAGE_SIZE, 4), -EINVAL);
    expect("non-canonical", heki_call(HEKI_LOCK_MAPPINGS, 0x0000900000000000UL, PAGE_SIZE, 0), -EINVAL);
    expect("unmapped", heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA + 3 * PAGE_SIZE, PAGE_SIZE, 0), -EFAULT);
    expect("writable mapping, read-only expected",
           heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA + PAGE_SIZE, PAGE_SIZE, EXPECT_READ_ONLY), -EPERM);
    expect("target page not locked",
           heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA + 2 * PAGE_SIZE, PAGE_SIZE, EXPECT_READ_ONLY), -EPERM);
    expect("executable mapping, no-exec expected",
           heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA, PAGE_SIZE, EXPECT_NO_EXEC), -EPERM);
    expect("LOCK_MAPPINGS", heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA, PAGE_SIZE, EXPECT_READ_ONLY), 0);

    /* 1. Rewrite the PTE: the table page is locked, the write is dropped. */
    u64 pte = pt_hi[0];
    ((volatile u64 *)pt_hi)[0] = (u64)evil_page | P | RW;
    flush();
    expect("PTE write dropped", ((volatile u64 *)pt_hi)[0] == pte, 1);
    expect("high VA still reaches the locked page", high(0), 0x10c4ed);
    /* Other entries of a locked table are locked too (documented). */
    /* 2. Rewrite the top-level entry in the live PML4: byte-locked, dropped. */
    u64 top = pml4[TOP_SLOT];
    volatile u64 *live = pml4;
    live[TOP_SLOT] = (u64)priv_pdpt | P | RW;
    expect("top-level entry write dropped", live[TOP_SLOT] == top, 1);
    live[TOP_SLOT + 1] = 0x1234000 | P; /* its neighbours stay writable */
    expect("neighbour entry written", live[TOP_SLOT + 1], 0x1234000 | P);
    live[TOP_SLOT + 1] = 0;

    /* 3. A private CR3: a copy of the PML4 whose slot 256 leads to the
     * attacker's tables, mapping HIGH_VA to the evil copy. */
    for (int i = 0; i < 512; i++) priv_pml4[i] = pml4[i];
    priv_pml4[TOP_SLOT] = (u64)priv_pdpt | P | RW;
    priv_pdpt[0] = (u64)priv_pd | P | RW;
    priv_pd[0] = (u64)priv_pt | P | RW;
    priv_pt[0] = (u64)evil_page | P | RW;
    u64 cr3 = read_cr3();
    write_cr3((u64)priv_pml4);
    u64 first = high(0);
    s64 polls = polls_until_locked_value();
    u64 restored_entry = ((volatile u64 *)priv_pml4)[TOP_SLOT];
    write_cr3(cr3);
    printf("private cr3: first=%lx polls=%ld entry_restored=%d\n", first, polls, restored_entry == top);
    expect("private CR3 translation put back", polls >= 0, 1);

    /* 4. IDTR pinned, then another IDT loaded. */
    struct dtr idtr = sidt();
    expect("PIN_DTR bad table", heki_call(HEKI_PIN_DTR, 2, 0, 0), -EINVAL);
    expect("PIN_DTR IDTR", heki_call(HEKI_PIN_DTR, 0, 0, 0), 0);
    expect("PIN_DTR GDTR", heki_call(HEKI_PIN_DTR, 1, 0, 0), 0);
    struct dtr evil = { 0xfff, (u64)fake_idt };
    __asm__ volatile("lidt %0" ::"m"(evil));
    s64 i = 0;
    while (sidt().base != idtr.base && i < 400000) { cpu_relax(); i++; }
    __asm__ volatile("lidt %0" ::"m"(idtr));
    expect("IDTR put back", i < 400000, 1);
    printf("heki translation done failures=%d\n", failures);
}
