/* Real mode: program the PIC and PIT (KVM's in-kernel models), take 10 timer interrupts (IRQ 0 at 1 kHz),
   then exit with the count: status (10 << 1) | 1 = 21. */
#include "common.inc"
TICKS = 0x500
.code16
start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    serial_init16
    movw $irq0, (8 * 4)            /* IVT vector 8 -> irq0 (CS 0xf000) */
    movw $0xf000, (8 * 4 + 2)
    movw $0, TICKS
    mov $0x11, %al                 /* PIC: ICW1 edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x08, %al                 /* ICW2: vectors 8-15 */
    out %al, $0x21
    mov $0x04, %al                 /* ICW3: slave on IRQ 2 */
    out %al, $0x21
    mov $0x01, %al                 /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0xfe, %al                 /* only IRQ 0 */
    out %al, $0x21
    mov $0x34, %al                 /* PIT channel 0, lo/hi byte, mode 2 */
    out %al, $0x43
    mov $(1193 & 0xff), %al        /* 1193182 Hz / 1193 = 1 kHz */
    out %al, $0x40
    mov $(1193 >> 8), %al
    out %al, $0x40
    puts16 waiting
    sti
1:  hlt
    cmpw $10, TICKS
    jb 1b
    cli
    puts16 done
    mov TICKS, %al
    exit_al

irq0:
    push %ax
    incw %ds:TICKS
    mov $0x20, %al                 /* EOI */
    out %al, $0x20
    pop %ax
    iret

waiting: .asciz "timer: waiting for 10 PIT interrupts\r\n"
done:    .asciz "timer: 10 interrupts taken\r\n"
#include "lib16.inc"
RESET_VECTOR
