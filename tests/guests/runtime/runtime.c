/* Test guest runtime: serial, boot info, IDT, SMP, heki calls. */
#include <stdarg.h>
#include "guest.h"

#define COM1 0x3f8
#define TRAMPOLINE_BASE 0x10000UL
#define LAPIC_BASE 0xfee00000UL
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x23
#define USER_CS 0x2b
#define TSS_SEL 0x30

extern u64 boot_info_ptr;
extern u32 boot_kind, ap_booting, ap_next_index;
extern u64 gdt[];
extern u8 tss[], user_stack_top[];
extern u64 exception_stubs[32];
extern u8 ap_trampoline_start[], ap_trampoline_end[];

/* ---- memory ---- */
void *memcpy(void *d, const void *s, unsigned long n) {
    u8 *dp = d; const u8 *sp = s;
    while (n--) *dp++ = *sp++;
    return d;
}
void *memset(void *d, int c, unsigned long n) {
    u8 *dp = d;
    while (n--) *dp++ = (u8)c;
    return d;
}
int memcmp(const void *a, const void *b, unsigned long n) {
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++) if (*x != *y) return *x - *y;
    return 0;
}
unsigned long strlen(const char *s) { unsigned long n = 0; while (s[n]) n++; return n; }

/* ---- serial ---- */
static volatile u32 print_lock;
static void lock(volatile u32 *l) { while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) cpu_relax(); }
static void unlock(volatile u32 *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static void serial_putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) cpu_relax();
    outb(COM1, (u8)c);
}
void putc(char c) { serial_putc(c); }
void puts(const char *s) {
    lock(&print_lock);
    while (*s) serial_putc(*s++);
    unlock(&print_lock);
}
static void put_num(u64 v, unsigned base, int is_signed) {
    char buf[24]; int i = 0;
    if (is_signed && (s64)v < 0) { serial_putc('-'); v = (u64)(-(s64)v); }
    do { u64 d = v % base; buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10); v /= base; } while (v);
    while (i) serial_putc(buf[--i]);
}
/* %s %c %d %u %x %ld %lu %lx %p (hex with 0x for %p); one line at a time. */
void printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lock(&print_lock);
    for (; *fmt; fmt++) {
        if (*fmt != '%') { serial_putc(*fmt); continue; }
        fmt++;
        int is_long = 0;
        while (*fmt == 'l') { is_long = 1; fmt++; }
        switch (*fmt) {
        case 's': { const char *s = va_arg(ap, const char *); while (s && *s) serial_putc(*s++); break; }
        case 'c': serial_putc((char)va_arg(ap, int)); break;
        case 'd': put_num(is_long ? (u64)va_arg(ap, s64) : (u64)(s64)va_arg(ap, int), 10, 1); break;
        case 'u': put_num(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0); break;
        case 'x': put_num(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0); break;
        case 'p': serial_putc('0'); serial_putc('x'); put_num(va_arg(ap, u64), 16, 0); break;
        case '%': serial_putc('%'); break;
        default: serial_putc('?'); break;
        }
    }
    unlock(&print_lock);
    va_end(ap);
}

/* ---- leaving the VM ---- */
void poweroff(void) {
    outb(0x600, 0x34);   /* ACPI S5 + SLP_EN */
    outb(0xf4, 0);       /* QEMU isa-debug-exit, for cross-checking under QEMU */
    for (;;) __asm__ volatile("cli; hlt");
}
void reboot_kbd(void) {
    outb(0x64, 0xfe);
    for (;;) __asm__ volatile("cli; hlt");
}
void reboot_acpi(void) {
    outb(0x602, 0x1);
    for (;;) __asm__ volatile("cli; hlt");
}
void triple_fault(void) {
    struct __attribute__((packed)) { u16 limit; u64 base; } empty = {0, 0};
    __asm__ volatile("lidt %0; ud2" ::"m"(empty));
    for (;;) __asm__ volatile("cli; hlt");
}

/* ---- boot information ---- */
int booted_via_pvh(void) { return boot_kind == 1; }
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_modlist_entry { u64 paddr, size, cmdline_paddr, reserved; };

const char *boot_cmdline(void) {
    if (booted_via_pvh()) return (const char *)((struct hvm_start_info *)boot_info_ptr)->cmdline_paddr;
    u8 *bp = (u8 *)boot_info_ptr;
    u64 ptr = *(u32 *)(bp + 0x228) | ((u64)*(u32 *)(bp + 0x0c8) << 32);
    return (const char *)ptr;
}
int boot_initramfs(u64 *addr, u64 *size) {
    if (booted_via_pvh()) {
        struct hvm_start_info *si = (struct hvm_start_info *)boot_info_ptr;
        if (!si->nr_modules) return 0;
        struct hvm_modlist_entry *m = (struct hvm_modlist_entry *)si->modlist_paddr;
        *addr = m->paddr; *size = m->size;
        return 1;
    }
    u8 *bp = (u8 *)boot_info_ptr;
    *addr = *(u32 *)(bp + 0x218) | ((u64)*(u32 *)(bp + 0x0c0) << 32);
    *size = *(u32 *)(bp + 0x21c) | ((u64)*(u32 *)(bp + 0x0c4) << 32);
    return *size != 0;
}
u64 boot_rsdp(void) {
    if (booted_via_pvh()) return ((struct hvm_start_info *)boot_info_ptr)->rsdp_paddr;
    return *(u64 *)((u8 *)boot_info_ptr + 0x070);
}
int cmdline_has(const char *word) {
    const char *c = boot_cmdline();
    unsigned long n = strlen(word);
    for (; c && *c; c++)
        if ((c == boot_cmdline() || c[-1] == ' ') && !memcmp(c, word, n) && (c[n] == ' ' || c[n] == 0)) return 1;
    return 0;
}

/* ---- exceptions ---- */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};
volatile struct exception_record last_exception;
/* Per-CPU would be nicer; tests fault on one CPU at a time. */
volatile u64 fixup_rip;
static volatile u64 user_return_rsp, user_return_rip, user_result;
static volatile int in_user;

volatile u64 irq_count[256];

void exception_dispatch(struct frame *f) {
    if (f->vector >= 32 && f->vector != 128) {
        /* An external interrupt: count it and acknowledge it at the LAPIC. */
        irq_count[f->vector]++;
        *(volatile u32 *)(LAPIC_BASE + 0xb0) = 0;
        return;
    }
    last_exception.vector = f->vector;
    last_exception.error = f->error;
    last_exception.rip = f->rip;
    last_exception.count++;
    if (in_user && (f->cs & 3) == 3) {
        /* The user function finished (ud2) or faulted: back to run_user's caller. */
        in_user = 0;
        user_result = f->vector == 6 ? f->rax : (u64)-1000 - f->vector;
        f->rip = user_return_rip;
        f->cs = KERNEL_CS;
        f->rsp = user_return_rsp;
        f->ss = KERNEL_DS;
        f->rflags = 0x2;
        return;
    }
    if (fixup_rip) {
        f->rip = fixup_rip;
        fixup_rip = 0;
        return;
    }
    printf("EXCEPTION vec=%lu err=%lx rip=%p\n", f->vector, f->error, f->rip);
    poweroff();
}

/* Each try_* runs one instruction with a fixup label; the handler jumps there on a fault. */
#define TRY(insn, ...)                                                                  \
    ({                                                                                  \
        u64 before = last_exception.count;                                              \
        __asm__ volatile("movabs $1f, %%r11\n\tmov %%r11, %[fx]\n\t" insn "\n1:\n\t"    \
                         "movq $0, %[fx]" : [fx] "=m"(fixup_rip) : __VA_ARGS__ : "r11", "memory"); \
        last_exception.count != before ? (int)last_exception.vector : 0;               \
    })
int try_wrmsr(u32 msr, u64 value) {
    return TRY("wrmsr", "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}
int try_rdmsr(u32 msr, u64 *value) {
    u32 lo = 0, hi = 0;
    u64 before = last_exception.count;
    __asm__ volatile("movabs $1f, %%r11\n\tmov %%r11, %[fx]\n\trdmsr\n1:\n\tmovq $0, %[fx]"
                     : [fx] "=m"(fixup_rip), "=a"(lo), "=d"(hi) : "c"(msr) : "r11", "memory");
    *value = ((u64)hi << 32) | lo;
    return last_exception.count != before ? (int)last_exception.vector : 0;
}
int try_write_cr0(u64 value) { return TRY("mov %[v], %%cr0", [v] "r"(value)); }
int try_write_cr4(u64 value) { return TRY("mov %[v], %%cr4", [v] "r"(value)); }

struct __attribute__((packed)) idt_entry { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));

static void set_gate(int vec, u64 handler, int dpl) {
    idt[vec] = (struct idt_entry){ (u16)handler, KERNEL_CS, 0, (u8)(0x8e | (dpl << 5)),
                                   (u16)(handler >> 16), (u32)(handler >> 32), 0 };
}
static void load_idt(void) {
    struct __attribute__((packed)) { u16 limit; u64 base; } p = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" ::"m"(p));
}
static void setup_tss(void) {
    /* 104-byte TSS plus an I/O bitmap letting user mode reach every port
     * (the heki doorbell included: the VMM, not the CPU, must refuse it). */
    u64 base = (u64)tss, limit = 104 + 8192;
    /* RSP0: kernel stack for exceptions taken in user mode. */
    static u8 ring0_stack[8192] __attribute__((aligned(16)));
    *(u64 *)(tss + 4) = (u64)(ring0_stack + sizeof(ring0_stack));
    *(u16 *)(tss + 102) = 104; /* I/O bitmap right after the TSS */
    tss[104 + 8192] = 0xff;    /* the bitmap's terminating byte */
    gdt[6] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) | (((limit >> 16) & 0xf) << 48) |
             (((base >> 24) & 0xff) << 56);
    gdt[7] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(TSS_SEL));
}

extern u8 user_exit[];
s64 run_user(s64 (*fn)(u64), u64 arg) {
    /* fn returns into user_exit (ud2), which brings us back with its RAX. */
    u64 top = (u64)user_stack_top;
    *(volatile u64 *)(top - 8) = (u64)user_exit;
    in_user = 1;
    __asm__ volatile(
        "movabs $1f, %%rax\n\t"
        "mov %%rax, %[ret_rip]\n\t"
        "mov %%rsp, %[ret_rsp]\n\t"
        "pushq %[uds]\n\t"          /* ss */
        "pushq %[ustack]\n\t"       /* rsp */
        "pushq $0x3002\n\t"         /* rflags: IOPL 3, interrupts off */
        "pushq %[ucs]\n\t"          /* cs */
        "pushq %[entry]\n\t"        /* rip */
        "iretq\n"
        "1:\n\t"
        : [ret_rip] "=m"(user_return_rip), [ret_rsp] "=m"(user_return_rsp)
        : [uds] "i"(USER_DS), [ucs] "i"(USER_CS), [ustack] "r"((u64)user_stack_top - 8),
          [entry] "r"((u64)fn), "D"(arg)
        : "rax", "memory");
    /* Data segments may hold user selectors now; restore kernel ones. */
    __asm__ volatile("mov %0, %%ds; mov %0, %%es" ::"r"((u64)KERNEL_DS));
    return (s64)user_result;
}


/* ---- heki ---- */
int heki_present(void) {
    u32 r[4];
    cpuid(0x40000100, 0, r);
    return r[0] >= 0x40000101 && r[1] == 0x696b6548 && r[2] == 0x6f736956 && r[3] == 0x49424172;
}
u32 heki_features(void) { u32 r[4]; cpuid(0x40000101, 0, r); return r[1]; }
u16 heki_port(void) { u32 r[4]; cpuid(0x40000101, 0, r); return (u16)r[2]; }
s64 heki_call(u64 fn, u64 a0, u64 a1, u64 a2) {
    u64 ret;
    __asm__ volatile("outl %%eax, %%dx" : "=a"(ret) : "a"(fn), "b"(a0), "c"(a1), "S"(a2), "d"((u64)heki_port())
                     : "memory");
    return (s64)ret;
}
static u64 protect_list[512] ALIGNED_PAGE;
s64 heki_protect(u64 pa, u64 epa, u64 perms) {
    protect_list[0] = 0;
    protect_list[1] = 1;
    protect_list[2] = pa;
    protect_list[3] = epa;
    protect_list[4] = perms;
    return heki_call(HEKI_PROTECT_MEMORY, (u64)protect_list, 0, 0);
}

extern u64 pml4_supervisor[];
void use_supervisor_page_tables(void) {
    __asm__ volatile("mov %0, %%cr3" ::"r"((u64)pml4_supervisor) : "memory");
}

/* ---- SMP ---- */
static volatile u32 cpus_checked_in, cpus_started;

static u8 checksum(const u8 *p, u32 len) { u8 s = 0; while (len--) s += *p++; return s; }
unsigned madt_lapic_count(void) {
    u8 *rsdp = (u8 *)boot_rsdp();
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8) || checksum(rsdp, 20)) return 0;
    u8 *xsdt = (u8 *)*(u64 *)(rsdp + 24);
    if (!xsdt || memcmp(xsdt, "XSDT", 4)) return 0;
    u32 entries = (*(u32 *)(xsdt + 4) - 36) / 8;
    for (u32 i = 0; i < entries; i++) {
        u8 *t = (u8 *)*(u64 *)(xsdt + 36 + 8 * i);
        if (memcmp(t, "APIC", 4)) continue;
        u32 len = *(u32 *)(t + 4), count = 0;
        for (u8 *e = t + 44; e < t + len; e += e[1]) {
            if (e[1] == 0) break;
            if (e[0] == 0 && (*(u32 *)(e + 4) & 1)) count++;
        }
        return count;
    }
    return 0;
}
unsigned cpu_count_from_cpuid(void) { u32 r[4]; cpuid(1, 0, r); return (r[1] >> 16) & 0xff; }

static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }
static u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static void delay(u32 loops) { for (volatile u32 i = 0; i < loops; i++) cpu_relax(); }

static unsigned wake_aps(void) {
    unsigned n = madt_lapic_count();
    if (!n) n = cpu_count_from_cpuid();
    if (n <= 1) return 1;
    memcpy((void *)TRAMPOLINE_BASE, ap_trampoline_start, (u64)(ap_trampoline_end - ap_trampoline_start));
    ap_booting = 1;
    lapic_write(0xf0, lapic_read(0xf0) | 0x100);            /* software enable */
    lapic_write(0x300, 0x000c4500);                          /* INIT, all excluding self */
    delay(100);
    for (int i = 0; i < 2; i++) {
        lapic_write(0x300, 0x000c4600 | (TRAMPOLINE_BASE >> 12)); /* SIPI */
        delay(100);
    }
    return n;
}

unsigned smp_start(void) {
    unsigned n = wake_aps();
    for (u32 spin = 0; spin < 2000000 && cpus_checked_in < n - 1; spin++) cpu_relax();
    return cpus_checked_in + 1;
}

unsigned smp_start_async(void) {
    unsigned n = wake_aps();
    for (u32 spin = 0; spin < 2000000 && cpus_started < n - 1; spin++) cpu_relax();
    return cpus_started + 1;
}

void ap_start(unsigned index) {
    load_idt();
    __atomic_fetch_add(&cpus_started, 1, __ATOMIC_SEQ_CST);
    if (ap_main) ap_main(index);
    __atomic_fetch_add(&cpus_checked_in, 1, __ATOMIC_SEQ_CST);
    for (;;) __asm__ volatile("cli; hlt");
}

extern void exc_64(void);

void runtime_start(void) {
    for (int v = 0; v < 32; v++) set_gate(v, exception_stubs[v], 0);
    set_gate(0x40, (u64)exc_64, 0);
    /* Software-enable the local APIC so it accepts interrupts. */
    *(volatile u32 *)(LAPIC_BASE + 0xf0) |= 0x100;
    load_idt();
    setup_tss();
    guest_main();
    poweroff();
}
