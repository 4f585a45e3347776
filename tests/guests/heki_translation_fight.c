#include "guest.h"
#define HEKI_LOCK_MAPPINGS 8
#define HIGH_VA 0xffff800000000000UL
#define TOP_SLOT 256
#define P 1UL
#define RW 2UL
#define A 0x20UL
extern u64 pml4[];
static u64 pdpt_hi[512] ALIGNED_PAGE, pd_hi[512] ALIGNED_PAGE, pt_hi[512] ALIGNED_PAGE;
static volatile u64 locked_page[512] ALIGNED_PAGE;
static volatile u64 evil_page[512] ALIGNED_PAGE;
static u64 priv_pdpt[512] ALIGNED_PAGE, priv_pd[512] ALIGNED_PAGE, priv_pt[512] ALIGNED_PAGE;
static u64 imm_pml4[512] ALIGNED_PAGE;   /* a private PML4 locked IMMUTABLE */
static u64 ap_pml4[512] ALIGNED_PAGE;    /* vCPU 1's private PML4 */
static u64 p3_pml4[512] ALIGNED_PAGE;    /* LOCK_MAPPINGS from here */
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
static u64 rd800(void) { u64 v, a = 0x800; __asm__ volatile("mov (%1), %0" : "=r"(v) : "r"(a) : "memory"); return v; }
static u64 high(void) { return *(volatile u64 *)HIGH_VA; }
static s64 poll_locked(void) {
    for (s64 i = 0; i < 4000000; i++) { if (high() == 0x10c4ed) return i; cpu_relax(); }
    return -1;
}
static void copy_pml4(u64 *dst) {
    for (int i = 0; i < 512; i++) dst[i] = pml4[i] & 1 ? pml4[i] | A : pml4[i];
    dst[TOP_SLOT] = (u64)priv_pdpt | P | RW | A;
}
static volatile int ap_phase;
static volatile s64 ap_polls = -7;
static volatile u64 ap_evil, ap_good, ap_rewrites;

void ap_main(unsigned cpu) {
    if (cpu != 1) return;
    while (ap_phase != 1) cpu_relax();
    u64 cr3 = read_cr3();
    write_cr3((u64)ap_pml4);
    ap_polls = poll_locked();
    volatile u64 *pp = ap_pml4;
    u64 evil_entry = (u64)priv_pdpt | P | RW | A;
    for (u64 i = 0; i < 200000; i++) {
        if (pp[TOP_SLOT] != evil_entry) { pp[TOP_SLOT] = evil_entry; invlpg(HIGH_VA); ap_rewrites++; }
        if (high() == 0xe7e7) ap_evil++; else ap_good++;
    }
    write_cr3(cr3);
    ap_phase = 2;
}

void guest_main(void) {
    locked_page[0] = 0x10c4ed;
    evil_page[0] = 0xe7e7;
    pml4[TOP_SLOT] = (u64)pdpt_hi | P | RW | A;
    pdpt_hi[0] = (u64)pd_hi | P | RW | A; pd_hi[0] = (u64)pt_hi | P | RW | A; pt_hi[0] = (u64)locked_page | P | A;
    priv_pdpt[0] = (u64)priv_pd | P | RW | A; priv_pd[0] = (u64)priv_pt | P | RW | A; priv_pt[0] = (u64)evil_page | P | A;
    write_cr3(read_cr3());
    u64 top = pml4[TOP_SLOT];
    printf("protect=%ld\n", heki_protect((u64)locked_page, (u64)locked_page + PAGE_SIZE, HEKI_READ | HEKI_IMMUTABLE));
    printf("gpa0x800 before=%lx\n", rd800());
    printf("lock=%ld\n", heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA, PAGE_SIZE, 1));
    for (volatile u64 w = 0; w < 3000000UL; w++) ;
    printf("gpa0x800 after=%lx top=%lx\n", rd800(), pml4[TOP_SLOT]);
    u64 cr3 = read_cr3();

    /* B1: a private PML4 locked IMMUTABLE: does the VMM write into it? */
    copy_pml4(imm_pml4);
    u64 evil_entry = imm_pml4[TOP_SLOT];
    printf("imm protect=%ld\n", heki_protect((u64)imm_pml4, (u64)imm_pml4 + PAGE_SIZE, HEKI_READ | HEKI_IMMUTABLE));
    ((volatile u64 *)imm_pml4)[300] = 0x5000 | P;
    printf("B1 guest write to imm pml4 dropped=%d\n", ((volatile u64 *)imm_pml4)[300] == 0);
    write_cr3((u64)imm_pml4);
    u64 first = high();
    s64 polls = poll_locked();
    u64 now = ((volatile u64 *)imm_pml4)[TOP_SLOT];
    write_cr3(cr3);
    printf("B1 first=%lx polls=%ld imm_entry=%lx evil=%lx top=%lx vmm_wrote_immutable=%d\n", first, polls, now, evil_entry, top, now == top);

    /* B2: vCPU 1 on a private CR3 while vCPU 0 spins without exits. */
    copy_pml4(ap_pml4);
    unsigned n = smp_start_async();
    printf("cpus=%u\n", n);
    if (n >= 2) {
        ap_phase = 1;
        u64 spins = 0;
        while (ap_phase != 2) { cpu_relax(); if (++spins % 20000000UL == 0) printf("waiting ap_phase=%d polls=%ld evil=%lu good=%lu rw=%lu\n", ap_phase, ap_polls, ap_evil, ap_good, ap_rewrites); }
        printf("B2 ap polls=%ld evil_reads=%lu good_reads=%lu rewrites=%lu\n", ap_polls, ap_evil, ap_good, ap_rewrites);
    }

    /* B3: LOCK_MAPPINGS from a private CR3 reaching a locked evil page. */
    printf("evil protect=%ld\n", heki_protect((u64)evil_page, (u64)evil_page + PAGE_SIZE, HEKI_READ | HEKI_IMMUTABLE));
    copy_pml4(p3_pml4);
    write_cr3((u64)p3_pml4);
    s64 r = heki_call(HEKI_LOCK_MAPPINGS, HIGH_VA, PAGE_SIZE, 1);
    u64 seen = high();
    polls = poll_locked();
    u64 p3 = ((volatile u64 *)p3_pml4)[TOP_SLOT];
    write_cr3(cr3);
    printf("B3 lock_from_private=%ld first=%lx polls=%ld p3_entry=%lx real_high=%lx\n", r, seen, polls, p3, high());
    /* And back on the private CR3 after that: what does it reach now? */
    ((volatile u64 *)p3_pml4)[TOP_SLOT] = evil_entry;
    printf("B3 rewrite of byte-locked p3 entry kept=%d\n", ((volatile u64 *)p3_pml4)[TOP_SLOT] == evil_entry);
    printf("heki b done\n");
}
