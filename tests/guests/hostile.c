/* hostile: a guest that attacks every device range it is given, then proves it (and so the VMM) is still alive.
 * pyhv boots it as a 64-bit ELF kernel (`--kernel`) at CPL 0 in its long-mode entry state. The host lists the
 * ranges on the kernel command line (tests/integration/test_hostile_guest.py reads them from `--dump-mtree`):
 *
 *   ranges=Pbase+len[/mask][!],Mbase+len[/mask][!],...   P: port I/O, M: MMIO; hex; /mask: the bits a write may
 *                                                         set (a reset or power-off bit left out); !: reads only
 *   pci=1      also place every BAR of every function on bus 0 and walk what it maps, then write the
 *              device-specific config space (0x40-0xff) of each function
 *   seed=N     the pseudo-random sequence
 *
 * For each range: every offset (or 64 spread offsets, the first, the last and one past the end of a larger
 * range), every access size (1, 2, 4 bytes; 8 more for MMIO), writes of 0, all ones, the top bit, 0x55/0xaa
 * patterns and random values, each followed by a read. Then it resets COM1 to 115200 8N1, prints
 * "HOSTILE done accesses=N", and prints "HOSTILE alive K" every 20000 port reads forever, for the host to see the
 * serial port still works while it asks QMP whether the VMM does. Freestanding: no libc, no writable globals.
 */
#include <stdint.h>
#include "entry64.h"

#define COM1 0x3f8

static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outw(uint16_t p, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(uint16_t p, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint16_t inw(uint16_t p) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint32_t inl(uint16_t p) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }

static void uart_init(void) {
    outb(COM1 + 1, 0x00);                      /* no interrupts */
    outb(COM1 + 3, 0x80);                      /* DLAB */
    outb(COM1 + 0, 0x01);                      /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);                      /* 8N1 */
    outb(COM1 + 2, 0x07);                      /* FIFOs on, cleared */
    outb(COM1 + 4, 0x03);                      /* DTR, RTS, no loopback */
}
static void putc_(char c) { for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++) {} outb(COM1, c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putu(uint64_t v) { char b[21]; int i = 20; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); puts_(b + i); }

static int starts(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
static int hexdigit(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}
static uint64_t hex(const char **s) {
    uint64_t v = 0;
    if ((*s)[0] == '0' && ((*s)[1] == 'x' || (*s)[1] == 'X')) *s += 2;
    for (int d; (d = hexdigit(**s)) >= 0; (*s)++) v = v << 4 | (uint64_t)d;
    return v;
}
static uint64_t next(uint64_t *x) { *x ^= *x << 13; *x ^= *x >> 7; *x ^= *x << 17; return *x; }

static uint64_t value(uint64_t *rng, int k, int size) {
    uint64_t all = size == 8 ? ~0ULL : (1ULL << (8 * size)) - 1;
    switch (k) {
    case 0: return 0;
    case 1: return all;
    case 2: return 1ULL << (8 * size - 1);
    case 3: return 0x5555555555555555ULL & all;
    case 4: return 0xaaaaaaaaaaaaaaaaULL & all;
    default: return next(rng) & all;
    }
}

static void access(int mmio, uint64_t addr, int size, uint64_t v, int readonly) {
    if (mmio) {
        volatile void *p = (volatile void *)(uintptr_t)addr;
        if (!readonly) {
            if (size == 1) *(volatile uint8_t *)p = (uint8_t)v;
            else if (size == 2) *(volatile uint16_t *)p = (uint16_t)v;
            else if (size == 4) *(volatile uint32_t *)p = (uint32_t)v;
            else *(volatile uint64_t *)p = v;
        }
        if (size == 1) (void)*(volatile uint8_t *)p;
        else if (size == 2) (void)*(volatile uint16_t *)p;
        else if (size == 4) (void)*(volatile uint32_t *)p;
        else (void)*(volatile uint64_t *)p;
        return;
    }
    uint16_t port = (uint16_t)addr;
    if (!readonly) {
        if (size == 1) outb(port, (uint8_t)v);
        else if (size == 2) outw(port, (uint16_t)v);
        else outl(port, (uint32_t)v);
    }
    if (size == 1) (void)inb(port);
    else if (size == 2) (void)inw(port);
    else (void)inl(port);
}

static uint64_t walk(int mmio, uint64_t base, uint64_t len, uint64_t mask, int readonly, uint64_t *rng) {
    uint64_t n = 0, steps = len <= 64 ? len + 1 : 67;
    for (uint64_t i = 0; i < steps; i++) {
        uint64_t off = len <= 64 ? i : i == 64 ? len - 1 : i == 65 ? len : i == 66 ? len - 8 : (len / 64) * i;
        for (int size = 1; size <= (mmio ? 8 : 4); size *= 2) {
            if (mmio && (base + off) % size) continue;      /* an unaligned MMIO access is not one exit */
            for (int k = 0; k < 7; k++) {
                access(mmio, base + off, size, value(rng, k, size) & mask, readonly);
                n++;
            }
        }
    }
    return n;
}

static uint32_t cfg_read(uint32_t addr, int off) { outl(0xcf8, addr | (uint32_t)off); return inl(0xcfc); }
static void cfg_write(uint32_t addr, int off, uint32_t v) { outl(0xcf8, addr | (uint32_t)off); outl(0xcfc, v); }

/* place every BAR of every function on bus 0 (memory from 0xe0000000, I/O from 0xc000, each aligned to its
 * size), turn decoding and bus mastering on and walk what the BARs map, as a firmware would find them */
static uint64_t bar_walk(uint64_t *rng) {
    uint64_t n = 0, mem = 0xe0000000ULL;
    uint32_t io = 0xc000;
    for (int devfn = 0; devfn < 256; devfn++) {
        uint32_t addr = 0x80000000u | (uint32_t)devfn << 8;
        if ((cfg_read(addr, 0) & 0xffff) == 0xffff) continue;
        if ((cfg_read(addr, 0x0c) >> 16 & 0x7f) != 0) continue;          /* bridges and others: header 0 only */
        for (int bar = 0; bar < 6; bar++) {
            int off = 0x10 + 4 * bar;
            uint32_t old = cfg_read(addr, off);
            cfg_write(addr, off, 0xffffffffu);
            uint32_t r = cfg_read(addr, off);
            cfg_write(addr, off, old);
            if (!r || r == 0xffffffffu) continue;
            if (r & 1) {
                uint32_t size = (~(r & ~3u) + 1) & 0xffff;
                if (!size) continue;
                io = (io + size - 1) & ~(size - 1);
                cfg_write(addr, off, io);
                cfg_write(addr, 0x04, cfg_read(addr, 0x04) | 0x5);
                n += walk(0, io, size, ~0ULL, 0, rng);
                io += size;
            } else {
                uint64_t size = (uint64_t)(~(r & ~0xfu)) + 1;
                int is64 = (r >> 1 & 3) == 2;
                size &= 0xffffffffULL;
                if (!size || size > 0x1000000) { if (is64) bar++; continue; }
                mem = (mem + size - 1) & ~(size - 1);
                cfg_write(addr, off, (uint32_t)mem);
                if (is64) cfg_write(addr, off + 4, 0);
                cfg_write(addr, 0x04, cfg_read(addr, 0x04) | 0x6);
                n += walk(1, mem, size, ~0ULL, 0, rng);
                mem += size;
                if (is64) bar++;
            }
        }
    }
    return n;
}

static uint64_t pci_walk(uint64_t *rng) {
    uint64_t n = bar_walk(rng);
    for (int devfn = 0; devfn < 256; devfn++) {
        uint32_t id_addr = 0x80000000u | (uint32_t)devfn << 8;
        outl(0xcf8, id_addr);
        if ((inl(0xcfc) & 0xffff) == 0xffff) continue;
        for (int off = 0x40; off < 0x100; off++) {
            for (int size = 1; size <= 4; size *= 2) {
                if (off % size) continue;
                for (int k = 0; k < 6; k++) {
                    outl(0xcf8, id_addr | (off & 0xfc));
                    access(0, 0xcfc + (off & 3), size, value(rng, k, size), 0);
                    n++;
                }
            }
        }
    }
    return n;
}

static void hostile_main(const char *cmdline) {
    uint64_t rng = 0x9e3779b97f4a7c15ULL, total = 0;
    int pci = 0;
    const char *ranges = 0;
    for (const char *s = cmdline; s && *s; s++) {
        if (s != cmdline && s[-1] != ' ') continue;
        if (starts(s, "seed=")) { const char *t = s + 5; rng ^= hex(&t) * 0x2545f4914f6cdd1dULL; if (!rng) rng = 1; }
        else if (starts(s, "pci=1")) pci = 1;
        else if (starts(s, "ranges=")) ranges = s + 7;
    }
    uart_init();
    puts_("HOSTILE start\r\n");
    for (const char *s = ranges; s && *s && *s != ' ';) {
        int mmio = *s == 'M';
        s++;
        uint64_t base = hex(&s), len = 0, mask = ~0ULL;
        int readonly = 0;
        if (*s == '+') { s++; len = hex(&s); }
        if (*s == '/') { s++; mask = hex(&s); }
        if (*s == '!') { s++; readonly = 1; }
        if (len) total += walk(mmio, base, len, mask, readonly, &rng);
        if (*s == ',') s++;
        else break;
    }
    if (pci) total += pci_walk(&rng);
    uart_init();                               /* whatever the walk left in COM1's registers */
    puts_("\r\nHOSTILE done accesses=");
    putu(total);
    puts_("\r\n");
    for (uint64_t k = 0;; k++) {
        for (int i = 0; i < 20000; i++) (void)inb(COM1 + 5);    /* pacing: exits cost alike emulated or not */
        puts_("HOSTILE alive ");
        putu(k);
        puts_("\r\n");
    }
}

void kmain(const uint8_t *boot_params) { hostile_main(boot_cmdline(boot_params)); }
