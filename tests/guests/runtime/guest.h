/* The test guest runtime's interface: everything a scenario needs. */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

/* Scenario entry points: guest_main on the boot CPU, ap_main on the others. */
void guest_main(void);
void ap_main(unsigned cpu) __attribute__((weak));

/* Port I/O and registers. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory"); }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static inline void cpuid(u32 leaf, u32 sub, u32 r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Serial output on COM1 (lines from different CPUs never interleave). */
void putc(char c);
void puts(const char *s);
void printf(const char *fmt, ...);

/* Leaving the VM. */
void poweroff(void) __attribute__((noreturn));
void reboot_kbd(void) __attribute__((noreturn));
void reboot_acpi(void) __attribute__((noreturn));
void triple_fault(void) __attribute__((noreturn));

/* Boot information from hvm_start_info (PVH) or boot_params (Linux protocol). */
int booted_via_pvh(void);
const char *boot_cmdline(void);
int boot_initramfs(u64 *addr, u64 *size);
u64 boot_rsdp(void);
int cmdline_has(const char *word);

/* Exceptions: the last one seen on this CPU and a count. */
struct exception_record { u64 vector, error, rip, count; };
extern volatile struct exception_record last_exception;
/* Run `op`; returns 0, or the vector of the exception it raised. */
int try_wrmsr(u32 msr, u64 value);
int try_rdmsr(u32 msr, u64 *value);
int try_write_cr0(u64 value);
int try_write_cr4(u64 value);
/* Where the next exception on this CPU resumes (0: report it and power off). */
extern volatile u64 fixup_rip;

/* External interrupts seen, per vector (vector 0x40 has a handler). */
extern volatile u64 irq_count[256];
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }

/* Run fn(arg) at CPL 3 (with IOPL 3 so it may do port I/O); returns its result. */
s64 run_user(s64 (*fn)(u64), u64 arg);

/* Switch to page tables without user pages (needed before turning on SMEP/SMAP). */
void use_supervisor_page_tables(void);

/* SMP: start every other vCPU (found in the ACPI MADT); returns the count of CPUs. */
unsigned smp_start(void);
/* Like smp_start, but returns once the APs are running ap_main. */
unsigned smp_start_async(void);
unsigned madt_lapic_count(void);
unsigned cpu_count_from_cpuid(void);

/* heki guest ABI. */
#define HEKI_VERSION 0
#define HEKI_PROTECT_MEMORY 1
#define HEKI_PROTECT_BYTES 2
#define HEKI_PIN_CR 3
#define HEKI_PIN_MSR 4
#define HEKI_QUERY 5
#define HEKI_SET_SHARED 6
#define HEKI_PRIVATE_MEMORY 7
#define HEKI_QUERY_PRIVATE 0x200
#define HEKI_QUERY_UNMAPPED 0x400
#define HEKI_READ 1
#define HEKI_WRITE 2
#define HEKI_EXEC 4
#define HEKI_IMMUTABLE 8
int heki_present(void);
u32 heki_features(void);
u16 heki_port(void);
s64 heki_call(u64 fn, u64 a0, u64 a1, u64 a2);
/* Protect [pa, epa) with `perms` through a one-entry page list. */
s64 heki_protect(u64 pa, u64 epa, u64 perms);

/* Memory helpers (the compiler may call these). */
void *memcpy(void *d, const void *s, unsigned long n);
void *memset(void *d, int c, unsigned long n);
int memcmp(const void *a, const void *b, unsigned long n);
unsigned long strlen(const char *s);

#define PAGE_SIZE 4096UL
#define ALIGNED_PAGE __attribute__((aligned(4096)))

#endif
