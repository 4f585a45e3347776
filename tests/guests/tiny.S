/* The boot benchmark's guest: the least a PVH guest can do. Prints one line
 * on COM1 and powers off (ACPI S5 at 0x600; isa-debug-exit 0xf4 for QEMU). */
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
        movl $message, %esi
        movw $0x3f8, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      movw $0x600, %dx
        movb $0x34, %al
        outb %al, %dx
        movw $0xf4, %dx
        outb %al, %dx
3:      cli
        hlt
        jmp 3b

        .section .rodata
message:
        .asciz "Hello from the tiny hekivisor benchmark guest\n"
