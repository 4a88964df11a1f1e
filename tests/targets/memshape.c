/* Resident memory in a chosen shape over time, for the memory detectors.
 *
 *   memshape --shape leak|warmup|sawtooth [--mb-per-s R] [--seconds S]
 *
 * leak:     keep_leaking() touches R MB/s (default 5) more and keeps it.
 * warmup:   fill_cache() fills a 300 MB cache, fast at first and slower as
 *           it fills (1 - e^(-t/10 s)), then holds it: flat.
 * sawtooth: churn_sawtooth() grows R MB/s for 8 s, then returns it all
 *           (munmap), every 10 s: a garbage-collected heap.
 * Memory is mapped anonymous and touched, so it is resident. Prints
 * "ready" at start; lives S seconds (default 120).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define MB (1024.0 * 1024.0)
#define TICK_US 100000

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A touched anonymous block of `bytes`. */
static NOINLINE void *touch(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    memset(p, 0x5a, bytes);
    return p;
}

static NOINLINE void keep_leaking(double rate, double until) {
    while (now_s() < until) {
        touch((size_t)(rate * MB * TICK_US / 1e6));
        usleep(TICK_US);
    }
}

static NOINLINE void fill_cache(double until) {
    /* Each 100 ms tick fills 1 - e^(-0.1/10) of what is left. */
    const double per_tick = 0.00995017;
    double want = 0, filled = 0;
    while (now_s() < until) {
        want += (300.0 - want) * per_tick;
        if (want - filled >= 1.0) {
            touch((size_t)((want - filled) * MB));
            filled = want;
        }
        usleep(TICK_US);
    }
}

static NOINLINE void churn_sawtooth(double rate, double until) {
    enum { MAX_BLOCKS = 128 };
    void *blocks[MAX_BLOCKS];
    size_t block = (size_t)(rate * MB * TICK_US / 1e6);
    while (now_s() < until) {
        int n = 0;
        double cycle = now_s();
        while (now_s() - cycle < 8.0 && n < MAX_BLOCKS) {
            blocks[n++] = touch(block);
            usleep(TICK_US);
        }
        for (int i = 0; i < n; i++)
            munmap(blocks[i], block);
        while (now_s() - cycle < 10.0)
            usleep(TICK_US);
    }
}

int main(int argc, char **argv) {
    const char *shape = "leak";
    double rate = 5, seconds = 120;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--shape"))
            shape = argv[i + 1];
        else if (!strcmp(argv[i], "--mb-per-s"))
            rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
    }
    printf("ready shape=%s\n", shape);
    fflush(stdout);
    double t0 = now_s(), until = t0 + seconds;
    if (!strcmp(shape, "leak"))
        keep_leaking(rate, until);
    else if (!strcmp(shape, "warmup"))
        fill_cache(until);
    else if (!strcmp(shape, "sawtooth"))
        churn_sawtooth(rate, until);
    else {
        fprintf(stderr, "memshape: unknown shape %s\n", shape);
        return 2;
    }
    return 0;
}
