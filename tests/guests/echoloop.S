/* Real mode, interrupt driven: prints a banner, then echoes what arrives on COM1 (IRQ 4 through the PIC) and
   idles in hlt between characters. 'Q' exits with status (5 << 1) | 1 = 11. With -D BUSY=1 it spins instead of
   halting between interrupts: a guest that is always busy (for `destroy` of a busy guest). A long-running
   guest for the lifecycle, QMP and Python API tests. */
#include "common.inc"
.code16
start:
    cli
    xor %ax, %ax
    mov %ax, %ss
    mov $0x7000, %sp
    mov %ax, %ds
    serial_init16
    mov $0x11, %al              /* master PIC: ICW1 edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x08, %al              /* ICW2: IRQ 0-7 -> vectors 0x08-0x0f */
    out %al, $0x21
    mov $0x04, %al              /* ICW3: slave on IRQ 2 */
    out %al, $0x21
    mov $0x01, %al              /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0xef, %al              /* OCW1: only IRQ 4 */
    out %al, $0x21
    mov $0xff, %al
    out %al, $0xa1
    movw $uart_irq, 0x30        /* IVT[0x0c] = f000:uart_irq */
    movw $0xf000, 0x32
    mov $(COM1 + 4), %dx
    mov $0x0b, %al              /* MCR: DTR, RTS, OUT2 (IRQ enable) */
    out %al, %dx
    mov $(COM1 + 1), %dx
    mov $0x01, %al              /* IER: received data available */
    out %al, %dx
    puts16 banner
    sti
idle:
#if BUSY
    jmp idle
#else
    hlt
    jmp idle
#endif

uart_irq:
    push %ax
    push %dx
1:  mov $(COM1 + 5), %dx
    in %dx, %al
    test $1, %al
    jz 2f
    mov $COM1, %dx
    in %dx, %al
    cmp $'Q', %al
    je quit
    out %al, %dx
    jmp 1b
2:  mov $0x20, %al              /* EOI */
    out %al, $0x20
    pop %dx
    pop %ax
    iret
quit:
    exit16 0x05

banner: .asciz "pyhv echo guest ready\r\n"
#include "lib16.inc"
RESET_VECTOR
