/* A PXE network boot program: what iPXE (or any PXE ROM) TFTP-loads to 0000:7c00 and runs in real mode. It prints
 * "pxeboot: token " and the 16 bytes at `token` on COM1 and exits through the debug-exit port with 0x10 (pyhv and
 * QEMU end with status (0x10 << 1) | 1 = 33). The test writes a fresh token over the 16 '@' before serving it, so
 * the line on the serial port proves this very download ran. Built by tests/guests/disks.py (pxe_program).
 */
#include "common.inc"
#define RESULT_OK 0x10

    .code16
    .text
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    puts16 msg
    mov $RESULT_OK, %al
    out %al, $EXIT_PORT
1:  hlt
    jmp 1b

#include "lib16.inc"

msg:    .ascii "\r\npxeboot: token "
token:  .ascii "@@@@@@@@@@@@@@@@"
        .asciz "\r\n"
