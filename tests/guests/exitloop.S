/* Benchmark loop (bench/exits.py): COUNT iterations of one access kind in 32-bit protected mode, then exit
   through port 0xf4. MODE 0: empty loop; 1: port write (0x80); 2: port read (0x80); 3: MMIO write; 4: MMIO
   read. MMIO goes to 0xfe000000, unassigned in the PCI hole of both pyhv and QEMU (QEMU's -M pc maps RAM at
   0xa0000 when there is no VGA, so the legacy VGA window is not an exit there). Same image under both. */
#include "common.inc"
#ifndef MODE
#define MODE 0
#endif
#ifndef COUNT
#define COUNT 1000
#endif
MMIO_ADDR = 0xfe000000
.code16
start:
    enter_pm32 pm
.code32
pm:
    pm32_segments
    mov $COUNT, %ecx
    test %ecx, %ecx
    jz 2f
1:
#if MODE == 1
    out %al, $0x80
#elif MODE == 2
    in $0x80, %al
#elif MODE == 3
    mov %eax, MMIO_ADDR
#elif MODE == 4
    mov MMIO_ADDR, %eax
#endif
    dec %ecx
    jnz 1b
2:  mov $0, %al
    out %al, $EXIT_PORT
3:  hlt
    jmp 3b
GDT
RESET_VECTOR
