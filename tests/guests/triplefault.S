/* Protected mode: load an empty IDT and raise an exception: the CPU cannot deliver it (#GP, then #DF),
   which is a triple fault. (In real mode KVM's emulator ignores the IVT limit, so it must be protected mode.) */
#include "common.inc"
.code16
start:
    serial_init16
    puts16 msg
    enter_pm32 pm
.code32
pm:
    pm32_segments
    lidt (ROM_BASE + empty_idt)
    ud2
    hlt
msg: .asciz "triplefault: breaking the IDT\r\n"
empty_idt: .word 0
           .long 0
GDT
#include "lib16.inc"
RESET_VECTOR
