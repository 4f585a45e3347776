/*
 * Test guest runtime: entry points, GDT, page tables, exception stubs and the
 * AP trampoline. Entered either through PVH (32-bit protected mode, EBX =
 * hvm_start_info) or through the Linux 64-bit boot protocol (RSI = boot_params).
 */
#define KERNEL_CS   0x08
#define KERNEL_DS   0x10
#define KERNEL_CS32 0x18
#define USER_DS     0x23
#define USER_CS     0x2b
#define TSS_SEL     0x30
#define STACK_SIZE  16384

        /* PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit entry address. */
        .section .note.Xen, "a"
        .p2align 2
        .long 4, 4, 18
        .asciz "Xen"
        .p2align 2
        .long pvh_start

        .section .text.entry, "ax"
        .code32
        .globl pvh_start
pvh_start:
        cli
        movl %ebx, boot_info_ptr
        movl $1, boot_kind
        jmp enter_long_mode32

/* Shared by the BSP (PVH) and the APs: protected mode to long mode. */
enter_long_mode32:
        lgdt gdt_ptr
        movw $KERNEL_DS, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xc0000080, %ecx          /* EFER.LME */
        rdmsr
        orl $0x100, %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80010001, %eax           /* PG | WP | PE */
        movl %eax, %cr0
        ljmp $KERNEL_CS, $long_mode_entry

        .code64
long_mode_entry:
        movw $KERNEL_DS, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorw %ax, %ax
        movw %ax, %fs
        movw %ax, %gs
        cmpl $0, ap_booting
        jne ap_long_mode
        movabsq $bsp_stack_top, %rsp
        call runtime_start              /* never returns */
1:      hlt
        jmp 1b

ap_long_mode:
        movl $1, %eax
        lock xaddl %eax, ap_next_index  /* eax = this AP's index (1..) */
        movl %eax, %edi
        movl %eax, %ebx
        imull $STACK_SIZE, %ebx
        movabsq $ap_stacks, %rsp
        addq %rbx, %rsp
        call ap_start                   /* never returns */
2:      cli
        hlt
        jmp 2b

/* The Linux 64-bit boot protocol enters 0x200 bytes into the image. */
        .section .text.startup64, "ax"
        .globl startup_64
startup_64:
        cli
        movq %rsi, boot_info_ptr
        movl $2, boot_kind
        lgdt gdt_ptr
        movabsq $pml4, %rax
        movq %rax, %cr3
        movabsq $bsp_stack_top, %rsp
        pushq $KERNEL_CS
        movabsq $long_mode_entry, %rax
        pushq %rax
        lretq

        .text
/* Exception stubs: push a dummy error code where the CPU does not. */
        .macro EXC_NOERR n
        .globl exc_\n
exc_\n:
        pushq $0
        pushq $\n
        jmp exception_common
        .endm
        .macro EXC_ERR n
        .globl exc_\n
exc_\n:
        pushq $\n
        jmp exception_common
        .endm
        EXC_NOERR 0
        EXC_NOERR 1
        EXC_NOERR 2
        EXC_NOERR 3
        EXC_NOERR 4
        EXC_NOERR 5
        EXC_NOERR 6
        EXC_NOERR 7
        EXC_ERR 8
        EXC_NOERR 9
        EXC_ERR 10
        EXC_ERR 11
        EXC_ERR 12
        EXC_ERR 13
        EXC_ERR 14
        EXC_NOERR 15
        EXC_NOERR 16
        EXC_ERR 17
        EXC_NOERR 18
        EXC_NOERR 19
        EXC_NOERR 20
        EXC_ERR 21
        EXC_NOERR 22
        EXC_NOERR 23
        EXC_NOERR 24
        EXC_NOERR 25
        EXC_NOERR 26
        EXC_NOERR 27
        EXC_NOERR 28
        EXC_ERR 29
        EXC_ERR 30
        EXC_NOERR 31
        /* Vector 0x80: return from user mode (see run_user). */
        EXC_NOERR 128
        /* Vector 0x40: the device interrupt the MSI-X tests program. */
        EXC_NOERR 64

exception_common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi
        call exception_dispatch
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rbp
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rbx
        popq %rax
        addq $16, %rsp
        iretq

/* User-mode functions started by run_user return here; ud2 hands RAX back. */
        .globl user_exit
user_exit:
        ud2

        .globl exception_stubs
        .section .rodata
        .p2align 3
exception_stubs:
        .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
        .quad exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
        .quad exc_16, exc_17, exc_18, exc_19, exc_20, exc_21, exc_22, exc_23
        .quad exc_24, exc_25, exc_26, exc_27, exc_28, exc_29, exc_30, exc_31
        .globl exception_stub_user_return
exception_stub_user_return:
        .quad exc_128

/* AP trampoline: copied to TRAMPOLINE_BASE (0x10000), entered in real mode with CS = 0x1000. */
        .section .rodata
        .code16
        .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
        cli
        lgdtl %cs:(tramp_gdt_ptr - ap_trampoline_start)
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        .byte 0x66, 0xea                /* ljmpl $KERNEL_CS32, $ap_protected */
        .long ap_protected
        .word KERNEL_CS32
tramp_gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
ap_trampoline_end:

        .text
        .code32
ap_protected:
        movw $KERNEL_DS, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        jmp enter_long_mode32
        .code64

        .data
        .p2align 3
        .globl boot_info_ptr, boot_kind, ap_booting, ap_next_index, gdt, tss
boot_info_ptr:  .quad 0
boot_kind:      .long 0
ap_booting:     .long 0
ap_next_index:  .long 1
        .p2align 3
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08: 64-bit kernel code */
        .quad 0x00cf92000000ffff        /* 0x10: kernel data */
        .quad 0x00cf9a000000ffff        /* 0x18: 32-bit kernel code (APs) */
        .quad 0x00cff2000000ffff        /* 0x20: user data (DPL 3) */
        .quad 0x00affa000000ffff        /* 0x28: 64-bit user code (DPL 3) */
tss_desc:
        .quad 0                         /* 0x30: TSS, filled in by runtime_start */
        .quad 0
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

/* Identity map of the first 4 GiB with 2 MiB pages (covers the LAPIC). */
        .p2align 12
        .globl pml4
pml4:
        .quad pdpt + 0x7                /* present, writable, user */
        .fill 511, 8, 0
pdpt:
        .quad pd + 0x7
        .quad pd + 0x1000 + 0x7
        .quad pd + 0x2000 + 0x7
        .quad pd + 0x3000 + 0x7
        .fill 508, 8, 0
pd:
        .set page, 0
        .rept 2048
        .quad (page << 21) | 0x87       /* present, writable, user, 2 MiB */
        .set page, page + 1
        .endr

/* The same map without the user bit, for running with SMEP/SMAP on. */
        .p2align 12
        .globl pml4_supervisor
pml4_supervisor:
        .quad pdpt_supervisor + 0x3
        .fill 511, 8, 0
pdpt_supervisor:
        .quad pd_supervisor + 0x3
        .quad pd_supervisor + 0x1000 + 0x3
        .quad pd_supervisor + 0x2000 + 0x3
        .quad pd_supervisor + 0x3000 + 0x3
        .fill 508, 8, 0
pd_supervisor:
        .set page, 0
        .rept 2048
        .quad (page << 21) | 0x83       /* present, writable, 2 MiB */
        .set page, page + 1
        .endr

        .bss
        .p2align 12
        .globl tss
tss:    .fill 104, 1, 0
        /* I/O permission bitmap: all ports allowed at CPL 3 (bits clear), then the terminator. */
io_bitmap:
        .fill 8192, 1, 0
        .fill 1, 1, 0   /* terminator: set to 0xff by runtime_start (bss holds zeros only) */
        .p2align 4
bsp_stack:
        .fill STACK_SIZE, 1, 0
bsp_stack_top:
        .globl ap_stacks
ap_stacks:
        .fill STACK_SIZE * 16, 1, 0
        .globl user_stack_top
user_stack:
        .fill STACK_SIZE, 1, 0
user_stack_top:
