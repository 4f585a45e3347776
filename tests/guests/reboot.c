#include "guest.h"

/* Prints "boot", then resets the way the command line says. */
void guest_main(void) {
    puts("boot\n");
    if (cmdline_has("reboot=kbd")) reboot_kbd();
    if (cmdline_has("reboot=acpi")) reboot_acpi();
    if (cmdline_has("reboot=triple")) triple_fault();
}
