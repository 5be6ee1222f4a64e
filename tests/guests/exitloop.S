/* Benchmark loop (bench/exits.py): COUNT iterations of one access kind, then exit through port 0xf4.
   MODE 0: empty loop; 1: port write (0x80); 2: port read (0x80); 3: MMIO write (0xa0000, unassigned);
   4: MMIO read (0xa0000). Same image under pyhv and QEMU. */
#include "common.inc"
#ifndef MODE
#define MODE 0
#endif
#ifndef COUNT
#define COUNT 1000
#endif
.code16
start:
    mov $0xa000, %ax
    mov %ax, %es
    mov $COUNT, %ecx
    test %ecx, %ecx
    jz 2f
1:
#if MODE == 1
    out %al, $0x80
#elif MODE == 2
    in $0x80, %al
#elif MODE == 3
    mov %al, %es:0
#elif MODE == 4
    mov %es:0, %al
#endif
    dec %ecx
    jnz 1b
2:  mov $0, %al
    out %al, $EXIT_PORT
3:  hlt
    jmp 3b
RESET_VECTOR
