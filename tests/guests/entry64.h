/* The entry of the project's C test guests: pyhv boots them as 64-bit ELF kernels (`--kernel`), entered at
 * _start at CPL 0 in its long-mode entry state (the low 4 GiB identity-mapped, %rsi -> boot_params). Interrupts
 * off, a stack below 40 MiB, then kmain(boot_params); kmain returning halts the vCPU. */
#include <stdint.h>

void kmain(const uint8_t *boot_params);

/* the kernel command line of boot_params (cmd_line_ptr at 0x228) */
static inline const char *boot_cmdline(const uint8_t *boot_params) {
    return (const char *)(uintptr_t)*(const uint32_t *)(boot_params + 0x228);
}

__asm__(
    ".section .text.entry, \"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    cli\n"
    "    mov $0x2800000, %rsp\n"
    "    mov %rsi, %rdi\n"
    "    call kmain\n"
    "1:  hlt\n"
    "    jmp 1b\n"
    ".previous\n");
