/* nicbench: a tight NIC driver for the emulation-models bench (bench/models.py --workload frames). pyhv boots it
 * as a 64-bit ELF kernel (`--kernel`) and it runs at CPL 0 in pyhv's long-mode entry state. (Ring 3, which PVM
 * runs natively, is out of reach: PVM clears IOPL in user mode, so the serial, PCI and debug-exit ports fault, and
 * it cannot deliver that fault to a kernel that is not PVM-aware.) Frames are written once, before the clock
 * starts; the timed loops touch a descriptor, a sequence number and a doorbell per frame. It finds the first
 * Intel 82540EM (8086:100e) or modern virtio-net (1af4:1041) on bus 0, drives it by polling (no interrupts) and:
 *
 *   mode=tx   sends count= frames of size= bytes (broadcast, EtherType 0x88b5, a sequence number at offset 14),
 *             batch= frames per doorbell (e1000 TDT write, virtio notification unless the device suppressed it)
 *   mode=rx   receives count= frames of EtherType 0x88b5 (others are recycled) and counts them
 *
 * then prints "NICBENCH driver=... mode=... size=... frames=N cycles=C" on COM1 and exits through the debug-exit
 * port with 0x10 (status 33); 0x11 on a device it could not set up. Parameters come from the kernel command line.
 * Freestanding: no libc, no writable globals, rings and buffers at fixed addresses.
 */
#include <stdint.h>
#include "entry64.h"

#define COM1 0x3f8
#define EXIT_PORT 0xf4
#define ETHERTYPE 0x88b5
#define RING 256
#define BUF 2048

/* guest-physical layout (RAM is identity-mapped; the ELF is linked at 16 MiB) */
#define DMA_BASE 0x3000000UL               /* rings, then buffers */
#define E1000_BAR 0xfeb00000UL
#define VIRTIO_BAR 0xfe000000UL

static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void outl(uint16_t p, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint32_t inl(uint16_t p) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
#define barrier() __asm__ volatile("" ::: "memory")
#define MMIO32(a) (*(volatile uint32_t *)(uintptr_t)(a))
#define MMIO16(a) (*(volatile uint16_t *)(uintptr_t)(a))
#define MMIO8(a) (*(volatile uint8_t *)(uintptr_t)(a))
#define MMIO64(a) (*(volatile uint64_t *)(uintptr_t)(a))

static void putc_(char c) { while (!(inb(COM1 + 5) & 0x20)) {} outb(COM1, c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putu(uint64_t v) { char b[21]; int i = 20; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); puts_(b + i); }
/* say so on COM1, then wait for a byte from the host there: it starts its clock and counters first */
static void ready(void) { puts_("NICBENCH ready\r\n"); while (!(inb(COM1 + 5) & 1)) {} (void)inb(COM1); }
static void exit_(uint8_t code) { outb(EXIT_PORT, code); for (;;) {} }
static void zero(void *p, uint64_t n) { volatile uint8_t *b = p; while (n--) *b++ = 0; }

/* --- the command line ---------------------------------------------------------------------------------------- */
struct params { int tx; uint64_t count, size, batch; };

static int starts(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
static uint64_t number(const char *s) { uint64_t v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (*s++ - '0'); return v; }

static struct params parse(const char *cmdline) {
    struct params p = { 1, 1000, 64, 1 };
    for (const char *s = cmdline; s && *s; s++) {
        if (s != cmdline && s[-1] != ' ') continue;
        if (starts(s, "mode=rx")) p.tx = 0;
        else if (starts(s, "count=")) p.count = number(s + 6);
        else if (starts(s, "size=")) p.size = number(s + 5);
        else if (starts(s, "batch=")) p.batch = number(s + 6);
    }
    if (p.size < 60) p.size = 60;
    if (p.size > 1514) p.size = 1514;
    if (p.batch < 1) p.batch = 1;
    if (p.batch > RING / 2) p.batch = RING / 2;
    return p;
}

/* --- PCI configuration (mechanism #1) ------------------------------------------------------------------------ */
static uint32_t cfg_read(int dev, int off) { outl(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc)); return inl(0xcfc); }
static void cfg_write(int dev, int off, uint32_t v) { outl(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc)); outl(0xcfc, v); }

/* the BAR's address, placing it at `fallback` if the VMM left it unassigned; turns on memory decoding and DMA */
static uint64_t bar(int dev, int index, uint64_t fallback) {
    int off = 0x10 + 4 * index;
    uint32_t lo = cfg_read(dev, off);
    int is64 = (lo & 6) == 4;
    uint64_t addr = (lo & ~0xfu) | (is64 ? (uint64_t)cfg_read(dev, off + 4) << 32 : 0);
    if (!addr) {
        cfg_write(dev, off, (uint32_t)fallback);
        if (is64) cfg_write(dev, off + 4, (uint32_t)(fallback >> 32));
        addr = fallback;
    }
    cfg_write(dev, 0x04, (cfg_read(dev, 0x04) & 0xffff) | 0x6);        /* memory space, bus master */
    return addr;
}

static void frame_header(uint8_t *f, const uint8_t *mac, uint64_t seq, uint64_t size) {
    for (int i = 0; i < 6; i++) { f[i] = 0xff; f[6 + i] = mac[i]; }
    f[12] = ETHERTYPE >> 8; f[13] = ETHERTYPE & 0xff;
    for (int i = 0; i < 8; i++) f[14 + i] = seq >> (8 * i);
    for (uint64_t i = 22; i < size; i++) f[i] = (uint8_t)i;
}

static int ours(const uint8_t *f) { return f[12] == (ETHERTYPE >> 8) && f[13] == (ETHERTYPE & 0xff); }

/* --- e1000 ----------------------------------------------------------------------------------------------------- */
struct e1000_desc { uint64_t addr; uint16_t len; uint8_t cso, cmd, status, css; uint16_t special; };
struct e1000_rdesc { uint64_t addr; uint16_t len, csum; uint8_t status, errors; uint16_t special; };

static uint64_t run_e1000(int dev, struct params p) {
    uint64_t r = bar(dev, 0, E1000_BAR);
    struct e1000_desc *tx = (void *)DMA_BASE;
    struct e1000_rdesc *rx = (void *)(DMA_BASE + 0x1000);
    uint8_t *bufs = (void *)(DMA_BASE + 0x10000);
    MMIO32(r + 0x0000) |= 0x04000000;                                   /* CTRL.RST */
    while (MMIO32(r + 0x0000) & 0x04000000) {}
    MMIO32(r + 0x0000) |= 0x40;                                         /* CTRL.SLU */
    MMIO32(r + 0x00d8) = 0xffffffff;                                    /* IMC: no interrupts, we poll */
    uint32_t ral = MMIO32(r + 0x5400), rah = MMIO32(r + 0x5404);
    uint8_t mac[6] = { ral, ral >> 8, ral >> 16, ral >> 24, rah, rah >> 8 };
    zero(tx, RING * 16); zero(rx, RING * 16);
    for (int i = 0; i < RING; i++) {
        tx[i].addr = (uint64_t)(uintptr_t)(bufs + i * BUF);
        rx[i].addr = (uint64_t)(uintptr_t)(bufs + (RING + i) * BUF);
    }
    MMIO32(r + 0x3800) = (uint32_t)(uintptr_t)tx; MMIO32(r + 0x3804) = 0; MMIO32(r + 0x3808) = RING * 16;
    MMIO32(r + 0x3810) = 0; MMIO32(r + 0x3818) = 0;
    MMIO32(r + 0x0410) = 10 | (8 << 10) | (6 << 20);                   /* TIPG */
    MMIO32(r + 0x0400) = 0x2 | 0x8 | (0x10 << 4) | (0x40 << 12);        /* TCTL: EN, PSP, CT, COLD */
    MMIO32(r + 0x2800) = (uint32_t)(uintptr_t)rx; MMIO32(r + 0x2804) = 0; MMIO32(r + 0x2808) = RING * 16;
    MMIO32(r + 0x2810) = 0; MMIO32(r + 0x2818) = RING - 1;
    MMIO32(r + 0x0100) = 0x2 | 0x8 | 0x10 | 0x8000 | 0x04000000;        /* RCTL: EN, UPE, MPE, BAM, SECRC; 2 KiB */
    for (int i = 0; i < RING && p.tx; i++)
        frame_header(bufs + i * BUF, mac, 0, p.size);
    ready();
    uint64_t done = 0, t0 = rdtsc();
    if (p.tx) {
        uint32_t tail = 0;
        while (done < p.count) {
            uint64_t n = p.count - done < p.batch ? p.count - done : p.batch;
            for (uint64_t k = 0; k < n; k++) {
                struct e1000_desc *d = &tx[tail];
                if (done + k >= RING)                                     /* the slot's previous frame is gone? */
                    while (!(((volatile struct e1000_desc *)d)->status & 1)) {}
                *(volatile uint64_t *)(bufs + tail * BUF + 14) = done + k;
                d->len = p.size; d->status = 0; d->cmd = 0x1 | 0x2 | 0x8;   /* EOP, IFCS, RS */
                tail = (tail + 1) % RING;
            }
            barrier();
            MMIO32(r + 0x3818) = tail;
            done += n;
        }
        uint32_t last = (tail + RING - 1) % RING;
        while (!(((volatile struct e1000_desc *)&tx[last])->status & 1)) {}
    } else {
        uint32_t next = 0, since = 0;
        while (done < p.count) {
            volatile struct e1000_rdesc *d = &rx[next];
            if (!(d->status & 1)) continue;
            barrier();
            if (ours(bufs + (RING + next) * BUF)) done++;
            d->status = 0;
            next = (next + 1) % RING;
            if (++since >= p.batch) { MMIO32(r + 0x2818) = (next + RING - 1) % RING; since = 0; }
        }
    }
    return rdtsc() - t0;
}

/* --- virtio-net (virtio 1.2 §4.1 PCI, §2.7 split rings), no features but VERSION_1 ------------------------------ */
struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vring { struct vdesc *desc; volatile uint16_t *avail; volatile uint32_t *used; uint16_t size, avail_idx, used_seen; uint64_t notify; };

static void vring_setup(uint64_t common, uint64_t notify_base, uint32_t mult, int index, struct vring *q, uint64_t mem) {
    MMIO16(common + 0x16) = index;
    uint16_t size = MMIO16(common + 0x18);
    if (size > RING) { size = RING; MMIO16(common + 0x18) = size; }
    q->size = size; q->avail_idx = 0; q->used_seen = 0;
    q->desc = (void *)mem; q->avail = (void *)(mem + 16 * RING); q->used = (void *)(mem + 16 * RING + 0x1000);
    zero((void *)mem, 16 * RING + 0x3000);
    MMIO16(common + 0x1a) = 0xffff;                                     /* no MSI-X vector */
    MMIO64(common + 0x20) = (uint64_t)(uintptr_t)q->desc;
    MMIO64(common + 0x28) = (uint64_t)(uintptr_t)q->avail;
    MMIO64(common + 0x30) = (uint64_t)(uintptr_t)q->used;
    q->notify = notify_base + (uint64_t)MMIO16(common + 0x1e) * mult;
    MMIO16(common + 0x1c) = 1;
}

static void vring_publish(struct vring *q, int index) {
    barrier();
    q->avail[1] = q->avail_idx;
    __asm__ volatile("mfence" ::: "memory");
    if (!(((volatile uint16_t *)q->used)[0] & 1))                       /* VIRTQ_USED_F_NO_NOTIFY */
        MMIO16(q->notify) = index;
}

static uint64_t run_virtio(int dev, struct params p) {
    uint64_t common = 0, notify = 0, devcfg = 0;
    uint32_t mult = 0;
    for (uint8_t cap = cfg_read(dev, 0x34) & 0xff; cap; cap = (cfg_read(dev, cap) >> 8) & 0xff) {
        uint32_t head = cfg_read(dev, cap);
        if ((head & 0xff) != 0x09) continue;                            /* vendor-specific: a virtio structure */
        int type = head >> 24, b = cfg_read(dev, cap + 4) & 0xff;
        uint64_t at = bar(dev, b, VIRTIO_BAR) + cfg_read(dev, cap + 8);
        if (type == 1 && !common) common = at;
        if (type == 2 && !notify) { notify = at; mult = cfg_read(dev, cap + 16); }
        if (type == 4 && !devcfg) devcfg = at;
    }
    if (!common || !notify) { puts_("nicbench: virtio structures missing\r\n"); exit_(0x11); }
    MMIO8(common + 0x14) = 0;
    while (MMIO8(common + 0x14)) {}
    MMIO8(common + 0x14) = 1 | 2;                                       /* ACKNOWLEDGE, DRIVER */
    MMIO32(common + 0x08) = 0; MMIO32(common + 0x0c) = 0;
    MMIO32(common + 0x08) = 1; MMIO32(common + 0x0c) = 1;               /* VIRTIO_F_VERSION_1 only */
    MMIO8(common + 0x14) = 1 | 2 | 8;                                   /* FEATURES_OK */
    if (!(MMIO8(common + 0x14) & 8)) { puts_("nicbench: features refused\r\n"); exit_(0x11); }
    struct vring rx, tx;
    vring_setup(common, notify, mult, 0, &rx, DMA_BASE);
    vring_setup(common, notify, mult, 1, &tx, DMA_BASE + 0x8000);
    MMIO8(common + 0x14) = 1 | 2 | 4 | 8;                               /* DRIVER_OK */
    uint8_t mac[6];
    for (int i = 0; i < 6; i++) mac[i] = devcfg ? MMIO8(devcfg + i) : 0x52;
    uint8_t *bufs = (void *)(DMA_BASE + 0x10000);
    const uint32_t hdr = 12;                                            /* struct virtio_net_hdr with num_buffers */
    for (int i = 0; i < RING && p.tx; i++) {
        zero(bufs + i * BUF, hdr);
        frame_header(bufs + i * BUF + hdr, mac, 0, p.size);
    }
    for (int i = 0; i < rx.size && !p.tx; i++) {
        rx.desc[i] = (struct vdesc){ (uint64_t)(uintptr_t)(bufs + (RING + i) * BUF), BUF, 2, 0 };   /* WRITE */
        rx.avail[2 + i] = i;
    }
    if (!p.tx) {
        rx.avail_idx = rx.size;
        vring_publish(&rx, 0);
    }
    ready();
    uint64_t done = 0, t0 = rdtsc();
    if (p.tx) {
        while (done < p.count) {
            uint64_t n = p.count - done < p.batch ? p.count - done : p.batch;
            for (uint64_t k = 0; k < n; k++) {
                while ((uint16_t)(tx.avail_idx - ((volatile uint16_t *)tx.used)[1]) >= tx.size) {}
                uint16_t slot = tx.avail_idx % tx.size;
                uint8_t *b = bufs + slot * BUF;
                *(volatile uint64_t *)(b + hdr + 14) = done + k;
                tx.desc[slot] = (struct vdesc){ (uint64_t)(uintptr_t)b, hdr + p.size, 0, 0 };
                tx.avail[2 + slot] = slot;
                tx.avail_idx++;
            }
            vring_publish(&tx, 1);
            done += n;
        }
        while (((volatile uint16_t *)tx.used)[1] != tx.avail_idx) {}
    } else {
        uint32_t since = 0;
        while (done < p.count) {
            if (((volatile uint16_t *)rx.used)[1] == rx.used_seen) continue;
            barrier();
            volatile uint32_t *elem = rx.used + 1 + 2 * (rx.used_seen % rx.size);
            uint32_t id = elem[0];
            if (ours(bufs + (RING + id) * BUF + hdr)) done++;
            rx.used_seen++;
            rx.avail[2 + rx.avail_idx % rx.size] = id;
            rx.avail_idx++;
            if (++since >= p.batch) { vring_publish(&rx, 0); since = 0; }
        }
    }
    return rdtsc() - t0;
}

static void bench_main(const char *cmdline) {
    struct params p = parse(cmdline);
    for (int dev = 0; dev < 32; dev++) {
        uint32_t id = cfg_read(dev, 0);
        int e1000 = id == 0x100e8086, virtio = id == 0x10411af4;
        if (!e1000 && !virtio) continue;
        uint64_t cycles = e1000 ? run_e1000(dev, p) : run_virtio(dev, p);
        puts_("NICBENCH driver="); puts_(e1000 ? "e1000" : "virtio-net");
        puts_(" mode="); puts_(p.tx ? "tx" : "rx");
        puts_(" size="); putu(p.size); puts_(" batch="); putu(p.batch);
        puts_(" frames="); putu(p.count); puts_(" cycles="); putu(cycles); puts_("\r\n");
        exit_(0x10);
    }
    puts_("nicbench: no e1000 or virtio-net on bus 0\r\n");
    exit_(0x11);
}

void kmain(const uint8_t *boot_params) { bench_main(boot_cmdline(boot_params)); }
