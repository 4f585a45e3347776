#include "guest.h"

/* A guest locks its own "kernel text", then attacks it every way it can. */
static u8 text[3 * 4096] ALIGNED_PAGE;

static void fill(u8 v) { memset(text, v, sizeof(text)); }
/* Reads memory for real: the compiler must not reuse the values it stored. */
static u64 peek(const void *p, int size) {
    switch (size) {
    case 1: return *(volatile const u8 *)p;
    case 2: return *(volatile const u16 *)p;
    case 4: return *(volatile const u32 *)p;
    default: return *(volatile const u64 *)p;
    }
}

void guest_main(void) {
    u8 *ro = text + 4096;            /* the locked page; text[0..4096) and [8192..) stay writable */
    fill(0x11);
    s64 rc = heki_protect((u64)ro, (u64)ro + 4096, HEKI_READ | HEKI_EXEC);
    printf("protect rc=%ld\n", rc);

    *(volatile u8 *)(ro + 1) = 0xaa;
    *(volatile u16 *)(ro + 2) = 0xbbbb;
    *(volatile u32 *)(ro + 4) = 0xcccccccc;
    *(volatile u64 *)(ro + 8) = 0xdddddddddddddddd;
    printf("widths byte=%lx word=%lx dword=%lx qword=%lx\n", peek(ro + 1, 1), peek(ro + 2, 2), peek(ro + 4, 4), peek(ro + 8, 8));

    /* rep stosb across the whole page. */
    __asm__ volatile("rep stosb" : "+D"(ro), "+c"((u64){4096}) : "a"(0xee) : "memory");
    ro = text + 4096;
    u32 changed = 0;
    for (int i = 0; i < 4096; i++) changed += peek(ro + i, 1) != 0x11;
    printf("rep stosb changed=%u\n", changed);

    /* Straddling writes: writable|locked and locked|writable. */
    *(volatile u64 *)(ro - 4) = 0x2222222222222222UL;
    *(volatile u64 *)(ro + 4092) = 0x3333333333333333UL;
    printf("straddle low=%lx,%lx lockedlow=%lx lockedhigh=%lx high=%lx\n", peek(text + 4092, 1), peek(text + 4095, 1),
           peek(ro, 1), peek(ro + 4095, 1), peek(text + 8192, 1));

    /* Byte-granular: two protected bytes in an otherwise writable page. */
    u8 *bp = text + 8192;
    rc = heki_call(HEKI_PROTECT_BYTES, (u64)bp + 16, 2, 0);
    printf("protect bytes rc=%ld\n", rc);
    *(volatile u64 *)(bp + 12) = 0x4444444444444444UL;   /* covers 12..19: 16,17 protected */
    printf("bytes 15=%lx 16=%lx 17=%lx 18=%lx\n", peek(bp + 15, 1), peek(bp + 16, 1), peek(bp + 17, 1), peek(bp + 18, 1));
    *(volatile u8 *)(bp + 100) = 0x55;
    printf("neighbour=%lx\n", peek(bp + 100, 1));
    printf("attack done\n");
}
