/* Real mode: count forever in the 32-bit word at guest-physical 0x500 (for pause/resume tests). */
#include "common.inc"
.code16
start:
    xor %ax, %ax
    mov %ax, %ds
    movl $0, 0x500
    serial_init16
    puts16 running
1:  incl 0x500
    jmp 1b
running: .asciz "counter: running\r\n"
#include "lib16.inc"
RESET_VECTOR
