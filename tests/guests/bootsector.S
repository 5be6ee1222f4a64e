/* A boot sector that tests a BIOS disk path end to end: it reads SECTORS sectors from LBA 1 of the boot drive
 * through int 13h (EDD extended read, AH=42h) to 0x1000:0000, sums them as 16-bit words and writes the verdict to
 * the debug-exit port 0xf4 (pyhv and QEMU exit with status (v << 1) | 1):
 *     RESULT_OK (0x10)          the sum equals EXPECTED (the disk builder computes it)
 *     RESULT_BAD_SUM (0x11)     data arrived but differs
 *     RESULT_READ_ERROR (0x12)  int 13h reported an error
 * It also says which on the debug console (port 0x402).
 * Built by tests/guests/disks.py with -DSECTORS=n -DEXPECTED=sum, linked at 0x7c00.
 */
#define RESULT_OK 0x10
#define RESULT_BAD_SUM 0x11
#define RESULT_READ_ERROR 0x12
#define DEBUGCON 0x402
#define DEBUG_EXIT 0xf4
#define LOAD_SEGMENT 0x1000

    .code16
    .text
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov $msg_start, %si
    call puts
    mov $0x42, %ah                  /* DL still holds the boot drive from the BIOS */
    mov $dap, %si
    int $0x13
    jc read_error
    mov $LOAD_SEGMENT, %ax
    mov %ax, %es
    xor %bx, %bx
    xor %dx, %dx
    mov $(SECTORS * 256), %cx
1:  add %es:(%bx), %dx
    add $2, %bx
    loop 1b
    cmp $EXPECTED, %dx
    jne bad_sum
    mov $msg_ok, %si
    call puts
    mov $RESULT_OK, %al
    jmp done
bad_sum:
    mov $msg_bad, %si
    call puts
    mov $RESULT_BAD_SUM, %al
    jmp done
read_error:
    mov $msg_err, %si
    call puts
    mov $RESULT_READ_ERROR, %al
done:
    out %al, $DEBUG_EXIT
2:  hlt
    jmp 2b

/* print the NUL-terminated string at DS:SI on the debug console, with interrupts off so that a BIOS interrupt
 * handler's own log lines cannot land in the middle of it */
puts:
    pushf
    cli
    push %ax
    push %dx
    mov $DEBUGCON, %dx
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  pop %dx
    pop %ax
    popf
    ret

msg_start: .asciz "bootsector: reading\n"
msg_ok:    .asciz "bootsector: checksum ok\n"
msg_bad:   .asciz "bootsector: checksum mismatch\n"
msg_err:   .asciz "bootsector: int 13h read error\n"

    .balign 4
dap:                                /* EDD disk address packet */
    .byte 0x10, 0
    .word SECTORS
    .word 0, LOAD_SEGMENT
    .quad 1

    .org 510
    .byte 0x55, 0xaa
