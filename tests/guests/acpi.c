#include "guest.h"

/* Walks RSDP -> XSDT -> tables, checks every checksum, counts MADT LAPICs. */
static int sum_ok(const u8 *p, u32 len) { u8 s = 0; while (len--) s += *p++; return s == 0; }

void guest_main(void) {
    u8 *rsdp = (u8 *)boot_rsdp();
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8)) { puts("acpi: no RSDP\n"); return; }
    printf("rsdp revision=%u checksum=%s\n", rsdp[15], sum_ok(rsdp, 20) && sum_ok(rsdp, 36) ? "ok" : "bad");
    u8 *xsdt = (u8 *)*(u64 *)(rsdp + 24);
    u32 n = (*(u32 *)(xsdt + 4) - 36) / 8;
    printf("table XSDT checksum=%s\n", sum_ok(xsdt, *(u32 *)(xsdt + 4)) ? "ok" : "bad");
    for (u32 i = 0; i < n; i++) {
        u8 *t = (u8 *)*(u64 *)(xsdt + 36 + 8 * i);
        printf("table %c%c%c%c checksum=%s\n", t[0], t[1], t[2], t[3], sum_ok(t, *(u32 *)(t + 4)) ? "ok" : "bad");
        if (!memcmp(t, "FACP", 4)) {
            u8 *dsdt = (u8 *)*(u64 *)(t + 140);
            printf("table %c%c%c%c checksum=%s\n", dsdt[0], dsdt[1], dsdt[2], dsdt[3],
                   sum_ok(dsdt, *(u32 *)(dsdt + 4)) ? "ok" : "bad");
        }
    }
    printf("madt lapics=%u cpuid cpus=%u\n", madt_lapic_count(), cpu_count_from_cpuid());
}
