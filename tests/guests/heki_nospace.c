#include "guest.h"

/* Locks every other page until the memslot budget runs out. */
static u8 pages[64 * 4096] ALIGNED_PAGE;

void guest_main(void) {
    int locked = 0;
    s64 rc = 0;
    for (int i = 0; i < 64; i += 2) {
        rc = heki_protect((u64)pages + i * 4096UL, (u64)pages + (i + 1) * 4096UL, HEKI_READ);
        if (rc) break;
        locked++;
    }
    printf("locked=%d rc=%ld query=%ld\n", locked, rc, heki_call(HEKI_QUERY, (u64)pages + 2 * locked * 4096UL, 0, 0));
}
