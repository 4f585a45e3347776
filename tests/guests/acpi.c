#include "guest.h"

/* Walks RSDP -> XSDT -> tables, checks every checksum, counts MADT LAPICs
 * (enabled, and online-capable but not enabled), and prints the CPU topology
 * CPUID leaves 0xB and 0x1F describe. */
static int sum_ok(const u8 *p, u32 len) { u8 s = 0; while (len--) s += *p++; return s == 0; }

/* MADT Local APIC entries whose flags are exactly `flags`. */
static unsigned madt_lapics_with_flags(u8 *xsdt, u32 flags) {
    u32 n = (*(u32 *)(xsdt + 4) - 36) / 8, count = 0;
    for (u32 i = 0; i < n; i++) {
        u8 *t = (u8 *)*(u64 *)(xsdt + 36 + 8 * i);
        if (memcmp(t, "APIC", 4)) continue;
        for (u8 *e = t + 44; e < t + *(u32 *)(t + 4) && e[1]; e += e[1])
            if (e[0] == 0 && (*(u32 *)(e + 4) & 3) == flags) count++;
    }
    return count;
}

/* Every level of a topology leaf, until the invalid one. */
static void print_topology_leaf(u32 leaf) {
    u32 r[4];
    cpuid(0, 0, r);
    if (r[0] < leaf) { printf("topology leaf=%x absent\n", leaf); return; }
    for (u32 level = 0; level < 8; level++) {
        cpuid(leaf, level, r);
        u32 type = (r[2] >> 8) & 0xff;
        if (!type) break;
        printf("topology leaf=%x level=%u type=%u shift=%u count=%u x2apic=%u\n", leaf, level, type, r[0] & 0x1f,
               r[1] & 0xffff, r[3]);
    }
}

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
    printf("madt online-capable=%u\n", madt_lapics_with_flags(xsdt, 2));
    print_topology_leaf(0xb);
    print_topology_leaf(0x1f);
}
