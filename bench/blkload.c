/* blkload: a small block load generator for the vhost-user-blk benchmark, run inside the test guest.
 *
 *   blkload seqread|seqwrite|randread DEVICE SECONDS [DEPTH] [BLOCK]
 *
 * O_DIRECT on the device; sequential modes use 1 MiB blocks, randread 4 KiB blocks at random aligned offsets.
 * DEPTH requests are kept in flight with Linux native AIO (io_submit/io_getevents, raw system calls, no
 * libaio), or, on a kernel without AIO (the project's mini kernel), by DEPTH threads doing synchronous I/O.
 * Prints one line: RESULT mode depth block bytes ops seconds. Built static by bench/vhost_blk.py.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng_state = 88172645463325252ULL;
static uint64_t xorshift(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

struct worker {
    int fd, write, random;
    size_t block;
    uint64_t blocks, ops, seed;
    double end;
    char *buf;
};

static void *work(void *arg) {
    struct worker *w = arg;
    uint64_t next = w->seed * 97;
    while (now() < w->end) {
        uint64_t blk;
        if (w->random) {
            w->seed ^= w->seed << 13; w->seed ^= w->seed >> 7; w->seed ^= w->seed << 17;
            blk = w->seed % w->blocks;
        } else {
            blk = next++ % w->blocks;
        }
        ssize_t n = w->write ? pwrite(w->fd, w->buf, w->block, blk * w->block)
                             : pread(w->fd, w->buf, w->block, blk * w->block);
        if (n != (ssize_t)w->block) { perror("blkload: I/O"); exit(1); }
        w->ops++;
    }
    return NULL;
}

/* without AIO: DEPTH threads, each with one synchronous request in flight */
static int threaded(int fd, int write, int random, size_t block, uint64_t blocks, int depth, double seconds,
                    const char *mode) {
    pthread_t *threads = calloc(depth, sizeof *threads);
    struct worker *w = calloc(depth, sizeof *w);
    double start = now();
    for (int i = 0; i < depth; i++) {
        w[i] = (struct worker){fd, write, random, block, blocks, 0, 88172645463325252ULL + i * 7919, start + seconds,
                               NULL};
        if (posix_memalign((void **)&w[i].buf, 4096, block)) return 1;
        memset(w[i].buf, 0x5a, block);
        pthread_create(&threads[i], NULL, work, &w[i]);
    }
    uint64_t ops = 0;
    for (int i = 0; i < depth; i++) {
        pthread_join(threads[i], NULL);
        ops += w[i].ops;
    }
    double elapsed = now() - start;
    if (write) fsync(fd);
    printf("RESULT %s %d %zu %llu %llu %.3f\n", mode, depth, block, (unsigned long long)(ops * block),
           (unsigned long long)ops, elapsed);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: blkload seqread|seqwrite|randread DEVICE SECONDS [DEPTH] [BLOCK]\n");
        return 2;
    }
    const char *mode = argv[1];
    int write = strcmp(mode, "seqwrite") == 0, random = strcmp(mode, "randread") == 0;
    double seconds = atof(argv[3]);
    int depth = argc > 4 ? atoi(argv[4]) : 1;
    size_t block = argc > 5 ? (size_t)atol(argv[5]) : (random ? 4096 : 1 << 20);
    if (depth < 1 || depth > 256 || block % 4096) {
        fprintf(stderr, "blkload: bad depth or block size\n");
        return 2;
    }
    int fd = open(argv[2], (write ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < block) { perror("BLKGETSIZE64"); return 1; }
    uint64_t blocks = size / block;

    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) < 0) {
        if (errno == ENOSYS)
            return threaded(fd, write, random, block, blocks, depth, seconds, mode);
        perror("io_setup");
        return 1;
    }
    struct iocb *cbs = calloc(depth, sizeof *cbs);
    struct iocb **ptrs = calloc(depth, sizeof *ptrs);
    struct io_event *events = calloc(depth, sizeof *events);
    char *busy = calloc(depth, 1);
    char *buf;
    if (posix_memalign((void **)&buf, 4096, block * depth)) return 1;
    memset(buf, 0x5a, block * depth);

    uint64_t next = 0, ops = 0, bytes = 0;
    int inflight = 0;
    double start = now(), end = start + seconds;
    for (int i = 0; i < depth; i++) {
        struct iocb *cb = &cbs[i];
        memset(cb, 0, sizeof *cb);
        cb->aio_fildes = fd;
        cb->aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cb->aio_buf = (uint64_t)(uintptr_t)(buf + i * block);
        cb->aio_nbytes = block;
        cb->aio_data = i;
    }
    for (;;) {
        int n = 0;
        if (now() < end) {                          /* refill every free slot */
            for (int i = 0; i < depth && inflight + n < depth; i++) {
                if (busy[i]) continue;
                uint64_t blk = random ? xorshift() % blocks : next++ % blocks;
                cbs[i].aio_offset = blk * block;
                busy[i] = 1;
                ptrs[n++] = &cbs[i];
            }
            if (n && syscall(SYS_io_submit, ctx, n, ptrs) != n) { perror("io_submit"); return 1; }
            inflight += n;
        }
        if (!inflight) break;
        int got = syscall(SYS_io_getevents, ctx, 1, depth, events, NULL);
        if (got < 0) { perror("io_getevents"); return 1; }
        for (int i = 0; i < got; i++) {
            struct iocb *cb = (struct iocb *)(uintptr_t)events[i].obj;
            if (events[i].res != (int64_t)block) {
                fprintf(stderr, "blkload: I/O error %lld\n", (long long)events[i].res);
                return 1;
            }
            busy[cb->aio_data] = 0;
            ops++;
            bytes += block;
        }
        inflight -= got;
    }
    double elapsed = now() - start;
    if (write) fsync(fd);
    printf("RESULT %s %d %zu %llu %llu %.3f\n", mode, depth, block, (unsigned long long)bytes,
           (unsigned long long)ops, elapsed);
    return 0;
}
