#include "guest.h"

/* The demo: a "kernel" locks its own text, then a rootkit tries to patch it. */
static u8 kernel_text[4096] ALIGNED_PAGE = "mov $1, %rax; syscall_entry: ...original kernel code...";

static void show(const char *when) {
    printf("[guest] %s: kernel text = \"%s\"\n", when, (const char *)kernel_text);
}

void guest_main(void) {
    if (!heki_present()) {
        puts("[guest] heki is not available (run with --heki enabled=on)\n");
        return;
    }
    show("at boot");
    s64 rc = heki_protect((u64)kernel_text, (u64)kernel_text + 4096, HEKI_READ | HEKI_EXEC | HEKI_IMMUTABLE);
    printf("[guest] locked kernel text at %p read+exec+immutable: rc=%ld\n", (u64)kernel_text, rc);
    puts("[rootkit] overwriting the syscall entry with a hook...\n");
    const char *hook = "jmp rootkit_hook";
    for (int i = 0; hook[i]; i++) *(volatile u8 *)(kernel_text + 15 + i) = (u8)hook[i];
    puts("[rootkit] trying to unlock the page...\n");
    rc = heki_protect((u64)kernel_text, (u64)kernel_text + 4096, HEKI_READ | HEKI_WRITE | HEKI_EXEC);
    printf("[rootkit] unlock rc=%ld (-1 = EPERM)\n", rc);
    show("after the attack");
}
