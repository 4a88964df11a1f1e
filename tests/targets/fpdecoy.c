/* A binary that fools `--unwind auto`'s prologue count (issue 14): built
 * like production code (-O2 -fomit-frame-pointer), except for 48 cold
 * functions that set up frame pointers, so most functions checked do. The
 * hot path, where every sample lands, keeps no frames:
 *
 *   main -> hot_outer -> hot_middle -> hot_inner (a leaf)
 *
 * A frame-pointer walk from hot_inner gets hot_inner, hot_middle (from the
 * leaf fix-up) and then whatever rbp holds: hot_outer and main are missing.
 * DWARF gets all four. `auto` picks frame pointers, and its check must
 * switch the target to DWARF.
 *
 *   fpdecoy [--seconds N]
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile unsigned long sink;

NOINLINE void cold_sink(unsigned long x) { sink += x; }

/* The decoys: never called in the hot loop, each with a frame. */
#pragma GCC push_options
#pragma GCC optimize("no-omit-frame-pointer")
#define COLD(n)                                                                \
    NOINLINE void cold_##n(unsigned long x) {                                  \
        cold_sink(x * (n + 1));                                                \
        cold_sink(x + n);                                                      \
    }
#define COLD8(a) COLD(a##0) COLD(a##1) COLD(a##2) COLD(a##3) COLD(a##4) COLD(a##5) COLD(a##6) COLD(a##7)
COLD8(1) COLD8(2) COLD8(3) COLD8(4) COLD8(5) COLD8(6)
#pragma GCC pop_options

typedef void (*cold_fn)(unsigned long);
#define REF8(a) cold_##a##0, cold_##a##1, cold_##a##2, cold_##a##3, cold_##a##4, cold_##a##5, cold_##a##6, cold_##a##7
/* Referenced, so the linker keeps them. */
cold_fn cold_table[] = {REF8(1), REF8(2), REF8(3), REF8(4), REF8(5), REF8(6)};

/* The hot path: no frames (the file's -fomit-frame-pointer). */
NOINLINE unsigned long hot_inner(unsigned long x) {
    for (unsigned long i = 0; i < 100000; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        __asm__ volatile("" : "+r"(x));
    }
    return x;
}

NOINLINE unsigned long hot_middle(unsigned long x) {
    x = hot_inner(x);
    __asm__ volatile("" ::: "memory"); /* no tail call */
    return x + 1;
}

NOINLINE unsigned long hot_outer(unsigned long x) {
    x = hot_middle(x);
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: fpdecoy [--seconds N]\n");
            return 2;
        }
    }
    if (argc > 99)
        cold_table[argc % 48](argc);
    printf("fpdecoy pid %d\n", getpid());
    fflush(stdout);
    double start = now();
    for (;;) {
        sink += hot_outer(sink);
        if (seconds > 0 && now() - start >= seconds)
            break;
    }
    return 0;
}
