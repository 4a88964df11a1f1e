/* Calls a function at a set rate between fixed units of work, for the probe
 * benchmarks.
 *
 *   callrate [--rate N] [--seconds S] [--libc] [--wait-start]
 *
 * A CPU-bound loop: units of arithmetic work, and after every k units a
 * call of probed_call() (or, with --libc, of the C library's rand_r), with
 * k chosen at start so the calls come N times a second (default 1000) when
 * nothing slows the loop. Whatever a probe costs shows as fewer units done.
 * With --wait-start the measured window (of --seconds, default 5) starts
 * at SIGUSR1. It prints "callrate ready pid=<pid>" when started and, at the
 * end, "units_per_s=<rate> calls_per_s=<rate> calls=<n>".
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile sig_atomic_t started = 1;
static volatile unsigned long sink;
static void on_start(int sig) { (void)sig; started = 1; }

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static NOINLINE void unit(void) {
    unsigned long x = sink;
    for (int i = 0; i < 50; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    sink = x;
}

/* The function the benchmark probes. */
NOINLINE unsigned probed_call(unsigned x) {
    sink ^= x;
    return (unsigned)sink * 2654435761u;
}

int main(int argc, char **argv) {
    double rate = 1000, seconds = 5;
    int libc = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--rate") && v) rate = atof(argv[++i]);
        else if (!strcmp(a, "--seconds") && v) seconds = atof(argv[++i]);
        else if (!strcmp(a, "--libc")) libc = 1;
        else if (!strcmp(a, "--wait-start")) started = 0;
        else { fprintf(stderr, "callrate: unknown argument %s\n", a); return 2; }
    }
    if (rate <= 0 || seconds <= 0) return 2;
    signal(SIGUSR1, on_start);
    /* Units per second, unprobed. */
    double t = now_s();
    unsigned long n = 0;
    while (now_s() - t < 0.2) { for (int i = 0; i < 1024; i++) unit(); n += 1024; }
    unsigned long k = (unsigned long)(n / 0.2 / rate);
    if (k < 1) k = 1;
    printf("callrate ready pid=%d\n", getpid());
    fflush(stdout);
    unsigned seed = 1;
    unsigned long units = 0, calls = 0;
    while (!started) {
        for (unsigned long i = 0; i < k; i++) unit();
        seed = libc ? (unsigned)rand_r(&seed) : probed_call(seed);
    }
    double start = now_s(), end = start + seconds, now = start;
    while (now < end) {
        for (unsigned long i = 0; i < k; i++) unit();
        units += k;
        seed = libc ? (unsigned)rand_r(&seed) : probed_call(seed);
        calls++;
        if ((calls & 63) == 0) now = now_s();
    }
    now = now_s();
    printf("units_per_s=%.0f calls_per_s=%.0f calls=%lu\n", units / (now - start), calls / (now - start), calls);
    sink ^= seed;
    return 0;
}
