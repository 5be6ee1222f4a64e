/* iommutest: a driver that programs pyhv's VT-d unit itself and proves DMA remapping from inside the guest. pyhv
 * boots it as a 64-bit ELF kernel (`--kernel`, `--machine pc --iommu intel`, a virtio-blk disk) at CPL 0 in its
 * long-mode entry state. It finds the remapping unit through ACPI (RSDP from boot_params -> XSDT -> DMAR -> DRHD),
 * the modern virtio-blk (1af4:1042) on bus 0, builds a root table, a context entry for the disk's source-id and
 * 4-level second-level tables mapping only the pages it names, turns on queued invalidation and translation,
 * and drives the disk by polling with VIRTIO_F_ACCESS_PLATFORM and I/O virtual addresses:
 *
 *   read0     sector 0 into a mapped page                       -> data lands there ("read0=" hex, host checks)
 *   unmapped  sector 0 into an unmapped IOVA (= the guest-physical address of a page filled with 0x5a)
 *             -> IOERR, a fault record (source-id, address, reason), the fault event MSI pending in the local
 *                APIC's IRR (interrupts stay off), and the page unchanged
 *   readonly  sector 0 into a read-only mapping                 -> IOERR, fault reason 5, page unchanged
 *   writeonly a write of sector 5 from a write-only mapping     -> IOERR, fault reason 6 (host: sector unchanged)
 *   remap     the data IOVA remapped to another page, IOTLB invalidated through the queue (wait descriptor with
 *             status write), sector 1 read                      -> lands in the new page, not the old one
 *   regflush  remapped back, invalidated through IOTLB_REG, sector 2 read -> lands in the first page again
 *   write     sector 3 written from the mapped page             -> host finds the bytes in the image
 *
 * Each step prints "STEP name ok" or "STEP name FAIL why" on COM1; at the end "IOMMUTEST ok" (exit 0x10, status
 * 33) or "IOMMUTEST FAIL" (0x11). Freestanding: no libc, no writable globals beyond the stack, fixed addresses.
 */
#include <stdint.h>
#include "entry64.h"

#define COM1 0x3f8
#define EXIT_PORT 0xf4
#define LAPIC 0xfee00000UL
#define FAULT_VECTOR 0x40

/* guest-physical pages (RAM is identity-mapped; the ELF is linked at 16 MiB, the stack below 40 MiB) */
#define PG(n) (0x3000000UL + 0x1000UL * (n))
#define ROOT PG(0)
#define CONTEXT PG(1)
#define PML4 PG(2)
#define PDPT PG(3)
#define PD PG(4)
#define PT PG(5)
#define IQ PG(6)
#define QSTATUS PG(7)
#define RINGS PG(16)
#define HDR PG(17)
#define STATUS PG(18)
#define DATA1 PG(19)
#define VICTIM PG(20)       /* never mapped: its guest-physical address is also the IOVA the "unmapped" step uses */
#define READONLY PG(21)
#define DATA2 PG(22)
#define WRITEONLY PG(23)
#define VIRTIO_BAR 0xfe000000UL

/* I/O virtual addresses: all in the first 2 MiB (one page table) but the victim's */
#define IOVA_RINGS 0x10000UL
#define IOVA_HDR 0x11000UL
#define IOVA_STATUS 0x12000UL
#define IOVA_DATA 0x13000UL
#define IOVA_RO 0x15000UL
#define IOVA_WO 0x17000UL
#define IOVA_UNMAPPED VICTIM
#define DID 1
#define QSIZE 16

/* VT-d registers */
#define R_CAP 0x08
#define R_ECAP 0x10
#define R_GCMD 0x18
#define R_GSTS 0x1c
#define R_RTADDR 0x20
#define R_FSTS 0x34
#define R_FECTL 0x38
#define R_FEDATA 0x3c
#define R_FEADDR 0x40
#define R_FEUADDR 0x44
#define R_IQT 0x88
#define R_IQA 0x90
#define GCMD_TE (1u << 31)
#define GCMD_SRTP (1u << 30)
#define GCMD_QIE (1u << 26)

static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void outl(uint16_t p, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint32_t inl(uint16_t p) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
#define barrier() __asm__ volatile("mfence" ::: "memory")
#define MMIO32(a) (*(volatile uint32_t *)(uintptr_t)(a))
#define MMIO16(a) (*(volatile uint16_t *)(uintptr_t)(a))
#define MMIO8(a) (*(volatile uint8_t *)(uintptr_t)(a))
#define MMIO64(a) (*(volatile uint64_t *)(uintptr_t)(a))
#define MEM64(a) (*(volatile uint64_t *)(uintptr_t)(a))
#define MEM8(a) (*(volatile uint8_t *)(uintptr_t)(a))

static void putc_(char c) { while (!(inb(COM1 + 5) & 0x20)) {} outb(COM1, c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void puthex(uint64_t v) { puts_("0x"); for (int i = 60; i >= 0; i -= 4) putc_("0123456789abcdef"[(v >> i) & 0xf]); }
static void putbytes(uint64_t addr, int n) { for (int i = 0; i < n; i++) { uint8_t b = MEM8(addr + i); putc_("0123456789abcdef"[b >> 4]); putc_("0123456789abcdef"[b & 0xf]); } }
static void exit_(uint8_t code) { outb(EXIT_PORT, code); for (;;) {} }
static void fill(uint64_t addr, uint8_t v, uint64_t n) { while (n--) MEM8(addr++) = v; }
static int all(uint64_t addr, uint8_t v, uint64_t n) { while (n--) if (MEM8(addr++) != v) return 0; return 1; }
static int same(uint64_t a, uint64_t b, uint64_t n) { while (n--) if (MEM8(a++) != MEM8(b++)) return 0; return 1; }

/* one check: "STEP name ok|FAIL why"; returns 1 for a failure */
static int step(const char *name, int ok, const char *why) {
    puts_("STEP "); puts_(name); puts_(ok ? " ok" : " FAIL "); if (!ok) puts_(why); puts_("\r\n");
    return !ok;
}

/* --- ACPI: the DRHD's register base ---------------------------------------------------------------------------- */
static int sig(uint64_t a, const char *s) { for (int i = 0; i < 4; i++) if (MEM8(a + i) != (uint8_t)s[i]) return 0; return 1; }

static uint64_t find_drhd(const uint8_t *boot_params) {
    uint64_t rsdp = *(const uint64_t *)(boot_params + 0x070);           /* acpi_rsdp_addr */
    if (!rsdp || !sig(rsdp, "RSD ")) return 0;
    uint64_t xsdt = *(volatile uint64_t *)(uintptr_t)(rsdp + 24);
    uint32_t len = MMIO32(xsdt + 4);
    for (uint64_t e = xsdt + 36; e + 8 <= xsdt + len; e += 8) {
        uint64_t t = *(volatile uint64_t *)(uintptr_t)e;
        if (!sig(t, "DMAR")) continue;
        uint32_t tlen = MMIO32(t + 4);
        for (uint64_t s = t + 48; s + 4 <= t + tlen; s += MMIO16(s + 2)) {
            if (MMIO16(s) == 0 && MMIO16(s + 2) >= 16) return MEM64(s + 8);   /* DRHD: register base */
            if (MMIO16(s + 2) == 0) break;
        }
    }
    return 0;
}

/* --- PCI ------------------------------------------------------------------------------------------------------ */
static uint32_t cfg_read(int dev, int off) { outl(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc)); return inl(0xcfc); }
static void cfg_write(int dev, int off, uint32_t v) { outl(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc)); outl(0xcfc, v); }

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

/* --- VT-d ----------------------------------------------------------------------------------------------------- */
struct unit { uint64_t base; uint32_t gcmd; uint16_t iqt; };

static void map(uint64_t iova, uint64_t gpa, uint64_t perm) { MEM64(PT + 8 * ((iova >> 12) & 511)) = gpa | perm; }

static void gcmd(struct unit *u, uint32_t bits, uint32_t wait) {
    MMIO32(u->base + R_GCMD) = u->gcmd | bits;
    while ((MMIO32(u->base + R_GSTS) & wait) != wait) {}
    u->gcmd |= bits & (GCMD_TE | GCMD_QIE);
}

/* submit descriptors and a wait descriptor with status write; spin until the unit wrote the status */
static int queue(struct unit *u, uint64_t lo, uint64_t hi) {
    static const uint32_t done = 0x600d;
    MEM64(QSTATUS) = 0;
    MEM64(IQ + 16 * u->iqt) = lo; MEM64(IQ + 16 * u->iqt + 8) = hi; u->iqt = (u->iqt + 1) % 256;
    MEM64(IQ + 16 * u->iqt) = 5 | 1 << 5 | (uint64_t)done << 32; MEM64(IQ + 16 * u->iqt + 8) = QSTATUS;
    u->iqt = (u->iqt + 1) % 256;
    barrier();
    MMIO64(u->base + R_IQT) = (uint64_t)u->iqt << 4;
    for (int spin = 0; spin < 1000000; spin++)
        if (MMIO32(QSTATUS) == done) return 1;
    return 0;
}

/* --- virtio-blk ---------------------------------------------------------------------------------------------- */
struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct disk { uint64_t common, notify; uint16_t avail_idx; };

#define DESC(i) ((volatile struct vdesc *)(uintptr_t)(RINGS + 16 * (i)))
#define AVAIL16(i) MMIO16(RINGS + 0x400 + 2 * (i))
#define USED16(i) MMIO16(RINGS + 0x800 + 2 * (i))

/* one request: header, data (IOVA, 512 bytes, device-writable for a read), status; returns the status byte */
static int request(struct disk *d, int write, uint64_t sector, uint64_t data_iova) {
    MEM64(HDR) = write ? 1 : 0; MEM64(HDR + 8) = sector;
    MEM8(STATUS) = 0xee;
    *DESC(0) = (struct vdesc){ IOVA_HDR, 16, 1, 1 };
    *DESC(1) = (struct vdesc){ data_iova, 512, (uint16_t)(1 | (write ? 0 : 2)), 2 };
    *DESC(2) = (struct vdesc){ IOVA_STATUS, 1, 2, 0 };
    AVAIL16(2 + d->avail_idx % QSIZE) = 0;
    d->avail_idx++;
    barrier();
    AVAIL16(1) = d->avail_idx;
    barrier();
    MMIO16(d->notify) = 0;
    for (int spin = 0; spin < 10000000; spin++)
        if (USED16(1) == d->avail_idx) return MEM8(STATUS);
    return -1;
}

static int disk_setup(int dev, struct disk *d) {
    uint64_t common = 0, notify = 0;
    uint32_t mult = 0;
    for (uint8_t cap = cfg_read(dev, 0x34) & 0xff; cap; cap = (cfg_read(dev, cap) >> 8) & 0xff) {
        uint32_t head = cfg_read(dev, cap);
        if ((head & 0xff) != 0x09) continue;
        int type = head >> 24, b = cfg_read(dev, cap + 4) & 0xff;
        uint64_t at = bar(dev, b, VIRTIO_BAR) + cfg_read(dev, cap + 8);
        if (type == 1 && !common) common = at;
        if (type == 2 && !notify) { notify = at; mult = cfg_read(dev, cap + 16); }
    }
    if (!common || !notify) return 0;
    MMIO8(common + 0x14) = 0;
    while (MMIO8(common + 0x14)) {}
    MMIO8(common + 0x14) = 1 | 2;
    MMIO32(common + 0x00) = 1;
    if (!(MMIO32(common + 0x04) & 2)) { puts_("iommutest: no VIRTIO_F_ACCESS_PLATFORM offered\r\n"); return 0; }
    MMIO32(common + 0x08) = 1; MMIO32(common + 0x0c) = 1 | 2;          /* VERSION_1, ACCESS_PLATFORM */
    MMIO32(common + 0x08) = 0; MMIO32(common + 0x0c) = 0;
    MMIO8(common + 0x14) = 1 | 2 | 8;
    if (!(MMIO8(common + 0x14) & 8)) { puts_("iommutest: features refused\r\n"); return 0; }
    MMIO16(common + 0x16) = 0;
    MMIO16(common + 0x18) = QSIZE;
    MMIO16(common + 0x1a) = 0xffff;
    fill(RINGS, 0, 0x1000);
    MMIO64(common + 0x20) = IOVA_RINGS;                                 /* I/O virtual addresses */
    MMIO64(common + 0x28) = IOVA_RINGS + 0x400;
    MMIO64(common + 0x30) = IOVA_RINGS + 0x800;
    d->notify = notify + (uint64_t)MMIO16(common + 0x1e) * mult;
    MMIO16(common + 0x1c) = 1;
    MMIO8(common + 0x14) = 1 | 2 | 4 | 8;
    d->common = common;
    d->avail_idx = 0;
    return 1;
}

/* the last fault record the unit wrote: F set, source-id, reason, address; cleared afterwards */
static int fault(struct unit *u, int sid, uint64_t addr, int reason) {
    uint64_t cap = MMIO64(u->base + R_CAP);
    uint64_t fro = ((cap >> 24) & 0x3ff) * 16, nfr = ((cap >> 40) & 0xff) + 1;
    int found = 0;
    for (uint64_t i = 0; i < nfr; i++) {
        uint64_t rec = u->base + fro + 16 * i;
        uint64_t lo = MMIO64(rec), hi = MMIO64(rec + 8);
        if (!(hi >> 63)) continue;
        puts_("fault record "); puthex(lo); puts_(" "); puthex(hi); puts_("\r\n");
        if ((hi & 0xffff) == (uint64_t)sid && (lo & ~0xfffUL) == addr && ((hi >> 32) & 0xff) == (uint64_t)reason)
            found = 1;
        MMIO32(rec + 12) = 1u << 31;                                    /* clear F */
    }
    MMIO32(u->base + R_FSTS) = 0x7d;                                    /* and the status bits */
    return found;
}

/* interrupts stay off (no IDT here): a delivered interrupt waits in the local APIC's IRR */
static int irr(int vector) { return (MMIO32(LAPIC + 0x200 + 0x10 * (vector / 32)) >> (vector % 32)) & 1; }

void kmain(const uint8_t *boot_params) {
    struct unit u = { find_drhd(boot_params), 0, 0 };
    if (!u.base) { puts_("iommutest: no DMAR table with a DRHD\r\n"); exit_(0x11); }
    puts_("iommutest: remapping unit at "); puthex(u.base); puts_("\r\n");
    int dev = -1;
    for (int i = 0; i < 32; i++) if (cfg_read(i, 0) == 0x10421af4) { dev = i; break; }
    if (dev < 0) { puts_("iommutest: no virtio-blk on bus 0\r\n"); exit_(0x11); }
    int sid = dev << 3;                                                 /* bus 0, function 0 */

    MMIO32(LAPIC + 0xf0) |= 0x1ff;                                      /* software-enable the local APIC */
    for (uint64_t p = ROOT; p < PG(8); p += 8) MEM64(p) = 0;
    MEM64(ROOT) = CONTEXT | 1;                                          /* bus 0 */
    MEM64(CONTEXT + 16 * sid) = PML4 | 1;                               /* present, TT 0 (translate) */
    MEM64(CONTEXT + 16 * sid + 8) = (uint64_t)DID << 8 | 2;             /* AW 2: 48-bit, 4 levels */
    MEM64(PML4) = PDPT | 3; MEM64(PDPT) = PD | 3; MEM64(PD) = PT | 3;
    map(IOVA_RINGS, RINGS, 3); map(IOVA_HDR, HDR, 1); map(IOVA_STATUS, STATUS, 3); map(IOVA_DATA, DATA1, 3);
    map(IOVA_RO, READONLY, 1); map(IOVA_WO, WRITEONLY, 2);
    fill(VICTIM, 0x5a, 4096); fill(READONLY, 0xa5, 4096); fill(DATA1, 0, 4096); fill(DATA2, 0, 4096);
    fill(WRITEONLY, 0xc3, 4096);

    MMIO32(u.base + R_FEDATA) = FAULT_VECTOR;                           /* fixed, edge */
    MMIO32(u.base + R_FEADDR) = 0xfee00000;                             /* to APIC 0 */
    MMIO32(u.base + R_FEUADDR) = 0;
    MMIO32(u.base + R_FECTL) = 0;                                       /* unmasked */
    MMIO64(u.base + R_RTADDR) = ROOT;
    gcmd(&u, GCMD_SRTP, GCMD_SRTP);
    MMIO64(u.base + R_IQT) = 0;
    MMIO64(u.base + R_IQA) = IQ;                                        /* 256 descriptors of 128 bits */
    gcmd(&u, GCMD_QIE, GCMD_QIE);
    if (!queue(&u, 1 | 1 << 4, 0) || !queue(&u, 2 | 1 << 4, 0)) {      /* global context and IOTLB flushes */
        puts_("iommutest: invalidation queue did not answer\r\n"); exit_(0x11);
    }
    gcmd(&u, GCMD_TE, GCMD_TE);

    struct disk d;
    int failures = 0;
    if (!disk_setup(dev, &d)) { puts_("iommutest: virtio-blk setup failed\r\n"); exit_(0x11); }

    int s = request(&d, 0, 0, IOVA_DATA);
    failures += step("read0", s == 0 && !all(DATA1, 0, 512), "status or no data");
    puts_("read0="); putbytes(DATA1, 32); puts_("\r\n");

    int before = irr(FAULT_VECTOR);
    s = request(&d, 0, 0, IOVA_UNMAPPED);
    failures += step("unmapped-ioerr", s == 1, "status not IOERR");
    failures += step("unmapped-record", fault(&u, sid, IOVA_UNMAPPED, 5), "no fault record for the source-id and address");
    failures += step("unmapped-interrupt", !before && irr(FAULT_VECTOR), "fault event not pending in the local APIC");
    failures += step("unmapped-untouched", all(VICTIM, 0x5a, 4096), "the unmapped page changed");

    s = request(&d, 0, 0, IOVA_RO);
    failures += step("readonly-ioerr", s == 1, "status not IOERR");
    failures += step("readonly-record", fault(&u, sid, IOVA_RO, 5), "no write fault record");
    failures += step("readonly-untouched", all(READONLY, 0xa5, 4096), "the read-only page changed");

    s = request(&d, 1, 5, IOVA_WO);
    failures += step("writeonly-ioerr", s == 1, "status not IOERR");
    failures += step("writeonly-record", fault(&u, sid, IOVA_WO, 6), "no read fault record");

    map(IOVA_DATA, DATA2, 3);                                           /* remap, then invalidate that page */
    failures += step("remap-queue", queue(&u, 2 | 3 << 4 | (uint64_t)DID << 16, IOVA_DATA), "no wait status");
    fill(DATA1, 0x11, 512);
    s = request(&d, 0, 1, IOVA_DATA);
    failures += step("remap", s == 0 && all(DATA1, 0x11, 512) && !all(DATA2, 0, 512), "data went to the old page");
    puts_("read1="); putbytes(DATA2, 32); puts_("\r\n");

    map(IOVA_DATA, DATA1, 3);                                           /* back, through the IOTLB register */
    uint64_t iotlb = u.base + ((MMIO64(u.base + R_ECAP) >> 8) & 0x3ff) * 16 + 8;
    MMIO64(iotlb) = 1UL << 63 | 1UL << 60;                              /* IVT, global */
    while (MMIO64(iotlb) >> 63) {}
    fill(DATA2, 0x22, 512);
    s = request(&d, 0, 2, IOVA_DATA);
    failures += step("regflush", s == 0 && all(DATA2, 0x22, 512) && !same(DATA1, DATA2, 512), "data went to the old page");
    puts_("read2="); putbytes(DATA1, 32); puts_("\r\n");

    for (int i = 0; i < 512; i++) MEM8(DATA1 + i) = (uint8_t)(i * 7 + 3);
    s = request(&d, 1, 3, IOVA_DATA);
    failures += step("write", s == 0, "status");

    puts_(failures ? "IOMMUTEST FAIL\r\n" : "IOMMUTEST ok\r\n");
    exit_(failures ? 0x11 : 0x10);
}
