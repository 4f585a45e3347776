#include "guest.h"

void guest_main(void) {
    u64 addr = 0, size = 0;
    printf("boot protocol=%s\n", booted_via_pvh() ? "pvh" : "linux");
    printf("cmdline=%s\n", boot_cmdline());
    if (boot_initramfs(&addr, &size)) {
        char first[9] = {0};
        memcpy(first, (void *)addr, size < 8 ? size : 8);
        printf("initramfs addr=%p size=%lu first8=%s\n", addr, size, first);
    } else {
        puts("initramfs none\n");
    }
    printf("rsdp=%p\n", boot_rsdp());
}
