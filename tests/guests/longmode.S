/* Real mode -> protected mode -> 64-bit long mode; in long mode print on COM1, check EFER.LMA and read the
   testdev MMIO magic (run with --device testdev). Exit status 0x67 ((0x33 << 1) | 1) when all is well. */
#include "common.inc"
.code16
start:
    serial_init16
    puts16 hello
    enter_pm32 pm
.code32
pm:
    pm32_segments
    enter_lm64 lm
.code64
lm:
    mov $0x7000, %rsp
    puts64 in_long_mode
    mov $0xc0000080, %ecx
    rdmsr
    test $0x400, %eax              /* EFER.LMA */
    jz 1f
    mov $0xfe800008, %rax
    mov (%rax), %eax
    cmp $0x56485950, %eax
    jne 2f
    mov $0xfe800000, %rbx
    movq $0x1122334455667788, %rcx
    mov %ecx, (%rbx)               /* 32-bit MMIO write from long mode */
    mov (%rbx), %eax
    cmp $0x55667788, %eax
    jne 3f
    mov $0x33, %al
    exit_al
1:  mov $1, %al
    exit_al
2:  mov $2, %al
    exit_al
3:  mov $3, %al
    exit_al
hello:        .asciz "longmode: entering long mode\r\n"
in_long_mode: .asciz "longmode: running in 64-bit mode\r\n"
GDT
#include "lib64.inc"
#include "lib16.inc"
RESET_VECTOR
