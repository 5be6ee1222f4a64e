/* 32-bit protected mode: enable the local APIC, install an interrupt gate for vector 0x41, wait with interrupts
   on. The test raises an MSI (address 0xfee00000, data 0x41: fixed, vector 0x41, APIC 0) through a KVM GSI
   route and its irqfd; the handler exits with status (0x41 << 1) | 1. Any other vector exits with 0x3e. */
#include "common.inc"
IDT_BASE   = 0x8000
MSI_VECTOR = 0x41
LAPIC_SVR  = 0xfee000f0
.code16
start:
    serial_init16
    puts16 hello
    enter_pm32 pm
.code32
pm:
    pm32_segments
    mov $IDT_BASE, %edi                      /* every vector -> other_irq */
    mov $256, %ecx
1:  mov $(ROM_BASE + other_irq), %eax
    movw %ax, (%edi)
    movw $0x08, 2(%edi)
    movw $0x8e00, 4(%edi)                    /* present, DPL 0, 32-bit interrupt gate */
    shr $16, %eax
    movw %ax, 6(%edi)
    add $8, %edi
    loop 1b
    mov $(IDT_BASE + 8 * MSI_VECTOR), %edi   /* vector 0x41 -> msi_irq */
    mov $(ROM_BASE + msi_irq), %eax
    movw %ax, (%edi)
    shr $16, %eax
    movw %ax, 6(%edi)
    lidt (ROM_BASE + idt_desc)
    movl $0x1ff, LAPIC_SVR                   /* APIC software enable, spurious vector 0xff */
    sti
2:  hlt
    jmp 2b

msi_irq:
    mov $MSI_VECTOR, %al
    exit_al
other_irq:
    mov $0x3e, %al
    exit_al

    .p2align 2
idt_desc:
    .word 256 * 8 - 1
    .long IDT_BASE
hello: .asciz "msi: waiting for vector 0x41\r\n"
GDT
#include "lib16.inc"
RESET_VECTOR
