/* The default demo guest: a banner with what the guest can see of its machine (CMOS memory size, clock), then
   a clean exit (status 1). Replaced by Linux as the default guest once direct kernel boot lands. */
#include "common.inc"
.code16
start:
    serial_init16
    puts16 banner
    puts16 mem_text
    mov $0x35, %al              /* CMOS 0x34/0x35: RAM above 16 MiB in 64 KiB units */
    out %al, $0x70
    in $0x71, %al
    mov %al, %ah
    mov $0x34, %al
    out %al, $0x70
    in $0x71, %al
    shr $4, %ax                 /* -> MiB */
    add $16, %ax
    call puthex16
    puts16 mib_text
    puts16 time_text
    mov $0x04, %al
    call cmos_byte
    call colon
    mov $0x02, %al
    call cmos_byte
    call colon
    mov $0x00, %al
    call cmos_byte
    puts16 bye
    mov $0xfe, %al              /* pulse the i8042 reset line: pyhv ends the VM with status 0 */
    out %al, $0x64
1:  hlt
    jmp 1b

cmos_byte:                      /* print the BCD CMOS register %al as two digits */
    out %al, $0x70
    in $0x71, %al
    jmp puthex8
colon:
    mov $':', %al
    mov $COM1, %dx
    out %al, %dx
    ret

banner:   .asciz "\r\n*** pyhv demo guest: real mode on a pyhv PC (see README; Linux replaces this demo) ***\r\n"
mem_text: .asciz "RAM (from CMOS, hex MiB): 0x"
mib_text: .asciz "\r\n"
time_text:.asciz "RTC time (UTC): "
bye:      .asciz "\r\nbye: resetting through the i8042 (pyhv ends the VM, status 0)\r\n"
#include "lib16.inc"
RESET_VECTOR
