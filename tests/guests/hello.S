/* Real mode: print a banner on COM1 and exit with status (0x10 << 1) | 1 = 0x21. */
#include "common.inc"
.code16
start:
    serial_init16
    puts16 banner
    exit16 0x10
banner: .asciz "pyhv test guest: hello from real mode\r\n"
#include "lib16.inc"
RESET_VECTOR
