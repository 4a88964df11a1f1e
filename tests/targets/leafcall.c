/* Callers of a leaf that sets up no frame, for the frame-pointer leaf
 * fix-up (issue 14).
 *
 *   leafcall [--mode own|memset|sleep] [--seconds N]
 *
 * main -> alpha_path -> alpha_work reaches the leaf twice per round,
 * main -> beta_path -> beta_work once: alpha_work : beta_work = 2 : 1.
 * The leaf is
 * - own:    `churn`, a leaf of this program (gcc sets up no frame in it,
 *           even with -fno-omit-frame-pointer);
 * - memset: libc's memset (libc keeps no frame pointers at all);
 * - sleep:  libc's clock_nanosleep, 1 ms a call (off-CPU: a syscall
 *           wrapper; nanosleep would be two frameless libc levels).
 * A frame-pointer walk from inside the leaf skips its caller
 * (alpha_work / beta_work): only the leaf fix-up brings it back.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile unsigned long sink;
static enum { OWN, MEMSET, SLEEP } mode = OWN;
static char buf[64 * 1024];
/* volatile: the size is not a constant, so memset stays a libc call. */
static volatile size_t len = sizeof buf;

/* A true leaf: no call, so no frame. ~50 µs of arithmetic. */
NOINLINE unsigned long churn(unsigned long x) {
    for (unsigned long i = 0; i < 100000; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        __asm__ volatile("" : "+r"(x));
    }
    return x;
}

/* One unit of the leaf's work. */
static inline void leaf_once(void) {
    switch (mode) {
    case OWN:
        sink += churn(sink);
        break;
    case MEMSET:
        for (int i = 0; i < 16; i++)
            memset(buf, (int)(sink + i), len);
        sink += (unsigned char)buf[7];
        break;
    case SLEEP: {
        struct timespec ts = {0, 1000000};
        clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
        break;
    }
    }
}

NOINLINE void alpha_work(void) {
    leaf_once();
    leaf_once();
    __asm__ volatile("" ::: "memory"); /* no tail call */
}

NOINLINE void beta_work(void) {
    leaf_once();
    __asm__ volatile("" ::: "memory");
}

NOINLINE void alpha_path(void) {
    alpha_work();
    __asm__ volatile("" ::: "memory");
}

NOINLINE void beta_path(void) {
    beta_work();
    __asm__ volatile("" ::: "memory");
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mode") && i + 1 < argc) {
            const char *m = argv[++i];
            if (!strcmp(m, "own"))
                mode = OWN;
            else if (!strcmp(m, "memset"))
                mode = MEMSET;
            else if (!strcmp(m, "sleep"))
                mode = SLEEP;
            else {
                fprintf(stderr, "leafcall: --mode own|memset|sleep\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: leafcall [--mode own|memset|sleep] [--seconds N]\n");
            return 2;
        }
    }
    printf("leafcall pid %d\n", getpid());
    fflush(stdout);
    double start = now();
    for (;;) {
        alpha_path();
        beta_path();
        if (seconds > 0 && now() - start >= seconds)
            break;
    }
    return 0;
}
