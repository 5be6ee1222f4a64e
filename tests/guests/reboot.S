/* Real mode: count boots in RAM at 0x600 (RAM survives a reset), reset through the i8042 until the third
   boot, then exit with the boot count: status (3 << 1) | 1 = 7 with --on-reset restart. */
#include "common.inc"
.code16
start:
    xor %ax, %ax
    mov %ax, %ds
    serial_init16
    cmpl $0x50594856, 0x604        /* magic: RAM was initialised by an earlier boot */
    je 1f
    movl $0x50594856, 0x604
    movw $0, 0x600
1:  incw 0x600
    puts16 booted
    cmpw $3, 0x600
    jae 2f
    mov $0xfe, %al                 /* pulse the reset line */
    out %al, $0x64
3:  hlt
    jmp 3b
2:  mov 0x600, %al
    exit_al
booted: .asciz "reboot: boot\r\n"
#include "lib16.inc"
RESET_VECTOR
