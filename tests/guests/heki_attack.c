#include "guest.h"

/* One forbidden write, then report: used to check each policy. */
static u8 text[4096] ALIGNED_PAGE;

void guest_main(void) {
    text[0] = 0x11;
    if (cmdline_has("host-locks")) {
        /* The host locked this page through the API; wait for it. */
        printf("text at %p\n", (u64)text);
        while (heki_call(HEKI_QUERY, (u64)text, 0, 0) == 7) cpu_relax();
    } else {
        printf("protect rc=%ld\n", heki_protect((u64)text, (u64)text + 4096, HEKI_READ | HEKI_EXEC));
    }
    *(volatile u8 *)text = 0x99;
    printf("after attack value=%x\n", *(volatile u8 *)text);
    /* Under host control, stay up so the host can inspect the VM. */
    if (cmdline_has("host-locks"))
        for (;;) __asm__ volatile("cli; hlt");
}
