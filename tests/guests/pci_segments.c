#include "virtio.h"

/* Finds every PCI segment the way an ACPI guest does: MCFG (through RSDP ->
 * XSDT) gives each segment's ECAM window. Lists the functions on bus 0 of
 * each segment, says which of them port 0xCF8 (configuration mechanism #1)
 * also reaches, then drives a virtio-rng found on the last segment through
 * its ECAM configuration space and BAR. */
static struct virtq_page queue ALIGNED_PAGE;
static u8 buffer[64] ALIGNED_PAGE;

struct segment { u64 ecam; u16 number; };

static u32 ecam_read32(u64 ecam, u32 slot, u32 reg) {
    return *(volatile u32 *)(ecam + ((u64)slot << 15) + (reg & 0xffc));
}

/* The MCFG entries; returns how many (at most `max`). */
static unsigned mcfg_segments(struct segment *out, unsigned max) {
    u8 *rsdp = (u8 *)boot_rsdp();
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8)) return 0;
    u8 *xsdt = (u8 *)*(u64 *)(rsdp + 24);
    u32 n = (*(u32 *)(xsdt + 4) - 36) / 8;
    for (u32 i = 0; i < n; i++) {
        u8 *t = (u8 *)*(u64 *)(xsdt + 36 + 8 * i);
        if (memcmp(t, "MCFG", 4)) continue;
        unsigned count = 0;
        for (u8 *e = t + 44; e + 16 <= t + *(u32 *)(t + 4) && count < max; e += 16, count++) {
            out[count].ecam = *(u64 *)e;
            out[count].number = *(u16 *)(e + 8);
        }
        return count;
    }
    return 0;
}

/* Fills `d` for the virtio function at `slot` of the ECAM window `ecam`. */
static int virtio_from_ecam(u64 ecam, u32 slot, struct virtio_dev *d) {
    u64 bar = (ecam_read32(ecam, slot, 0x10) & ~0xfUL) | ((u64)ecam_read32(ecam, slot, 0x14) << 32);
    u32 cap = ecam_read32(ecam, slot, 0x34) & 0xff;
    while (cap) {
        u32 head = ecam_read32(ecam, slot, cap);
        u32 type = (head >> 24) & 0xff, offset = ecam_read32(ecam, slot, cap + 8);
        if ((head & 0xff) == 0x09) {
            if (type == 1) d->common = (volatile u8 *)(bar + offset);
            if (type == 2) d->notify = (volatile u8 *)(bar + offset);
        }
        cap = (head >> 8) & 0xff;
    }
    d->q = &queue;
    d->slot = slot;
    d->bar = bar;
    return d->common && d->notify ? 0 : -1;
}

void guest_main(void) {
    struct segment segs[16];
    unsigned count = mcfg_segments(segs, 16);
    printf("mcfg segments=%u\n", count);
    u64 rng_ecam = 0;
    u32 rng_slot = 0;
    for (unsigned s = 0; s < count; s++) {
        printf("segment %u ecam=%lx\n", segs[s].number, segs[s].ecam);
        for (u32 slot = 0; slot < 32; slot++) {
            u32 id = ecam_read32(segs[s].ecam, slot, 0);
            if (id == 0xffffffffu) continue;
            u64 bar = ecam_read32(segs[s].ecam, slot, 0x10) & ~0xfUL;
            printf("segment %u slot %u id=%x bar=%lx\n", segs[s].number, slot, id, bar);
            if (id == 0x10441af4u) { rng_ecam = segs[s].ecam; rng_slot = slot; }
        }
    }
    for (u32 slot = 0; slot < 32; slot++) {
        u32 id = pci_read32(slot, 0);
        if (id != 0xffffffffu) printf("cf8 slot %u id=%x\n", slot, id);
    }
    if (!rng_ecam) { puts("no virtio-rng\n"); return; }
    struct virtio_dev d = {0};
    if (virtio_from_ecam(rng_ecam, rng_slot, &d)) { puts("virtio-rng: no capabilities\n"); return; }
    u8 status = virtio_start(&d);
    s64 len = virtio_read_into(&d, buffer, sizeof(buffer));
    int nonzero = 0;
    for (u32 i = 0; i < sizeof(buffer); i++) nonzero += buffer[i] != 0;
    printf("rng via ecam=%lx status=%x len=%ld random=%d\n", rng_ecam, status, len, nonzero > 32);
}
