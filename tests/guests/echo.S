/* Real mode, interrupt driven: COM1 receive interrupts (IRQ 4 through the in-kernel PIC) fill a buffer; the
   main loop echoes each byte upper-cased and exits on 'q' with the number of bytes received before it. */
#include "common.inc"
HEAD = 0x500        /* bytes stored by the interrupt handler */
TAIL = 0x502        /* bytes echoed by the main loop */
BUF  = 0x600
.code16
start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    movw $0, HEAD
    movw $0, TAIL
    serial_init16
    movw $irq4, (0x0c * 4)         /* IRQ 4 -> vector 0x0c */
    movw $0xf000, (0x0c * 4 + 2)
    mov $0x11, %al
    out %al, $0x20
    mov $0x08, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xef, %al                 /* unmask IRQ 4 only */
    out %al, $0x21
    mov $(COM1 + 4), %dx
    mov $0x08, %al                 /* MCR.OUT2: route the UART interrupt to the PIC, as on a PC */
    out %al, %dx
    mov $(COM1 + 1), %dx
    mov $0x01, %al                 /* IER: received data available */
    out %al, %dx
    puts16 ready
    sti
main:
    cli
    mov TAIL, %bx
    cmp HEAD, %bx
    jne 1f
    sti
    hlt
    jmp main
1:  sti
    mov BUF(%bx), %al
    incw TAIL
    cmp $'q', %al
    je done
    cmp $'a', %al
    jb 2f
    cmp $'z', %al
    ja 2f
    sub $0x20, %al
2:  mov $COM1, %dx
    out %al, %dx
    jmp main
done:
    puts16 bye
    mov TAIL, %ax
    dec %ax
    exit_al

irq4:
    push %ax
    push %bx
    push %dx
1:  mov $(COM1 + 5), %dx
    in %dx, %al
    test $0x01, %al                /* LSR.DR */
    jz 2f
    mov $COM1, %dx
    in %dx, %al
    mov HEAD, %bx
    and $0xff, %bx
    mov %al, BUF(%bx)
    incw HEAD
    jmp 1b
2:  mov $0x20, %al
    out %al, $0x20
    pop %dx
    pop %bx
    pop %ax
    iret

ready: .asciz "echo: ready\r\n"
bye:   .asciz "\r\necho: bye\r\n"
#include "lib16.inc"
RESET_VECTOR
