/* 32-bit protected mode: port and MMIO accesses that must reach the right device (run with --device testdev).
   Exit status 0x55 ((0x2a << 1) | 1) when every check passes; otherwise the number of the failed check. */
#include "common.inc"
.code16
start:
    serial_init16
    puts16 hello
    enter_pm32 pm
.code32
pm:
    pm32_segments
    /* 1: 32-bit port write/read of the testdev scratch register */
    mov $0x12345678, %eax
    out %eax, $0xe0
    xor %eax, %eax
    in $0xe0, %eax
    cmp $0x12345678, %eax
    jne f1
    /* 2: a byte read inside a 32-bit register */
    in $0xe1, %al
    cmp $0x56, %al
    jne f2
    /* 3: unassigned port reads all-ones */
    mov $0x5555, %dx
    in %dx, %ax
    cmp $0xffff, %ax
    jne f3
    /* 4: CMOS register D has VRT set */
    mov $0x0d, %al
    out %al, $0x70
    in $0x71, %al
    cmp $0x80, %al
    jne f4
    /* 5: unassigned MMIO (the VGA window) reads all-ones, also after a write */
    movl $0, 0xa0000
    mov 0xa0000, %eax
    cmp $0xffffffff, %eax
    jne f5
    /* 6: testdev MMIO magic */
    mov 0xfe800008, %eax
    cmp $0x56485950, %eax
    jne f6
    /* 7: testdev MMIO scratch */
    movl $0xcafebabe, 0xfe800000
    mov 0xfe800000, %eax
    cmp $0xcafebabe, %eax
    jne f7
    /* 8: the device counted exactly one write */
    mov 0xfe800004, %eax
    cmp $1, %eax
    jne f8
    /* 9: a 16-bit MMIO read of the upper half of the magic */
    movw 0xfe80000a, %ax
    cmp $0x5648, %ax
    jne f9
    /* 10: the ROM at the top of 4 GiB ignores writes */
    mov 0xffff0000, %ebx
    mov %ebx, %eax
    not %eax
    mov %eax, 0xffff0000
    mov 0xffff0000, %eax
    cmp %ebx, %eax
    jne f10
    /* 11: and so does its ISA BIOS window */
    mov 0xf0000, %ebx
    mov %ebx, %eax
    not %eax
    mov %eax, 0xf0000
    mov 0xf0000, %eax
    cmp %ebx, %eax
    jne f11
    /* 12: RAM keeps what is written */
    movl $0xa5a5a5a5, 0x200000
    mov 0x200000, %eax
    cmp $0xa5a5a5a5, %eax
    jne f12
    mov $0x2a, %al
    exit_al
f1: mov $1, %al
    exit_al
f2: mov $2, %al
    exit_al
f3: mov $3, %al
    exit_al
f4: mov $4, %al
    exit_al
f5: mov $5, %al
    exit_al
f6: mov $6, %al
    exit_al
f7: mov $7, %al
    exit_al
f8: mov $8, %al
    exit_al
f9: mov $9, %al
    exit_al
f10: mov $10, %al
    exit_al
f11: mov $11, %al
    exit_al
f12: mov $12, %al
    exit_al
hello: .asciz "dispatch: checking port and MMIO dispatch\r\n"
GDT
#include "lib16.inc"
RESET_VECTOR
