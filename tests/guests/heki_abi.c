#include "guest.h"

/* The heki ABI: discovery, every function, every error code. */
#define EPERM 1
#define E2BIG 7
#define EFAULT 14
#define EINVAL 22
#define ENOSYS 38

static u8 target[4 * 4096] ALIGNED_PAGE;
static u64 list2[512] ALIGNED_PAGE;
static u64 list3[512] ALIGNED_PAGE;
static int failures;

static void expect(const char *what, s64 got, s64 want) {
    if (got == want) {
        printf("ok %s\n", what);
    } else {
        printf("FAIL %s: got %ld want %ld\n", what, got, want);
        failures++;
    }
}

static s64 protect_list(u64 *l, u64 next, u64 n, u64 pa, u64 epa, u64 perms) {
    l[0] = next; l[1] = n; l[2] = pa; l[3] = epa; l[4] = perms;
    return heki_call(HEKI_PROTECT_MEMORY, (u64)l, 0, 0);
}

/* The doorbell port, looked up at CPL 0 (this host's CPUID answers user mode
 * with zeros for the hypervisor leaves). */
static u16 doorbell;
static s64 user_call(u64 fn) {
    u64 ret;
    __asm__ volatile("outl %%eax, %%dx" : "=a"(ret) : "a"(fn), "b"(0UL), "c"(0UL), "S"(0UL), "d"((u64)doorbell) : "memory");
    return (s64)ret;
}

void guest_main(void) {
    u32 r[4];
    cpuid(0x40000100, 0, r);
    expect("signature", heki_present(), 1);
    expect("max leaf", r[0], 0x40000101);
    cpuid(0x40000101, 0, r);
    expect("abi version", r[0], 1);
    /* PROTECT_MEMORY|BYTES, PIN_CR, PIN_MSR, DMA_GUARD, SHARED_MEMORY,
     * LOCK_MAPPINGS, PIN_DTR; never EXEC_ENFORCED (bit 2). */
    expect("features", r[1], 0x1fb);
    expect("abi revision", r[3], 1);
    printf("doorbell port=%x\n", r[2]);

    u64 t = (u64)target;
    expect("VERSION", heki_call(HEKI_VERSION, 0, 0, 0), 1);
    expect("unknown function", heki_call(99, 0, 0, 0), -ENOSYS);

    expect("SET_SHARED before PRIVATE_MEMORY", heki_call(HEKI_SET_SHARED, 0, 4096, 1), -EPERM);

    expect("unaligned range", heki_protect(t + 1, t + 4096, HEKI_READ), -EINVAL);
    expect("empty range", heki_protect(t, t, HEKI_READ), -EINVAL);
    expect("reversed range", heki_protect(t + 4096, t, HEKI_READ), -EINVAL);
    expect("unknown bits", heki_protect(t, t + 4096, HEKI_READ | 0x10), -EINVAL);
    expect("READ missing", heki_protect(t, t + 4096, HEKI_EXEC), -EINVAL);
    expect("npages over 170", protect_list(list2, 0, 171, t, t + 4096, HEKI_READ), -EINVAL);
    expect("unaligned list", heki_call(HEKI_PROTECT_MEMORY, (u64)list2 + 8, 0, 0), -EINVAL);
    expect("list outside RAM", heki_call(HEKI_PROTECT_MEMORY, 0x7ff0000000UL, 0, 0), -EFAULT);
    expect("range outside RAM", heki_protect(0x7ff0000000UL, 0x7ff0001000UL, HEKI_READ), -EFAULT);
    list3[0] = (u64)list2; list3[1] = 0;
    list2[0] = (u64)list3; list2[1] = 0;
    expect("cyclic list", heki_call(HEKI_PROTECT_MEMORY, (u64)list2, 0, 0), -E2BIG);

    expect("QUERY default", heki_call(HEKI_QUERY, t, 0, 0), 7);
    expect("QUERY outside RAM", heki_call(HEKI_QUERY, 0x7ff0000000UL, 0, 0), -EFAULT);
    expect("protect read+exec", heki_protect(t, t + 4096, HEKI_READ | HEKI_EXEC), 0);
    expect("QUERY protected", heki_call(HEKI_QUERY, t + 100, 0, 0), 5);
    expect("make writable again", heki_protect(t, t + 4096, 7), 0);
    expect("QUERY writable", heki_call(HEKI_QUERY, t, 0, 0), 7);

    expect("immutable lock", heki_protect(t + 4096, t + 8192, HEKI_READ | HEKI_IMMUTABLE), 0);
    expect("immutable cannot change", heki_protect(t + 4096, t + 8192, 7), -EPERM);
    expect("immutable overlap refused", heki_protect(t, t + 3 * 4096, HEKI_READ), -EPERM);
    expect("atomic: nothing applied", heki_call(HEKI_QUERY, t, 0, 0), 7);

    expect("bytes zero length", heki_call(HEKI_PROTECT_BYTES, t + 2 * 4096, 0, 0), -EINVAL);
    expect("bytes over 1 MiB", heki_call(HEKI_PROTECT_BYTES, t, (1 << 20) + 1, 0), -EINVAL);
    expect("bytes outside RAM", heki_call(HEKI_PROTECT_BYTES, 0x7ff0000000UL, 4, 0), -EFAULT);
    expect("bytes protect", heki_call(HEKI_PROTECT_BYTES, t + 2 * 4096 + 8, 4, 0), 0);
    expect("QUERY bytes flag", heki_call(HEKI_QUERY, t + 2 * 4096, 0, 0), 0x107);

    doorbell = heki_port();
    expect("user mode call refused", run_user((s64 (*)(u64))user_call, HEKI_VERSION), -EPERM);
    expect("user mode cannot lock", run_user((s64 (*)(u64))user_call, HEKI_PROTECT_BYTES), -EPERM);
    printf("heki abi done failures=%d\n", failures);
}
