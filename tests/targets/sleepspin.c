/* Alternates spinning and sleeping, for off-CPU and wall-clock profiles.
 *
 *   sleepspin [--spin-us N] [--sleep-us N] [--seconds S] [--threads N]
 *
 * Each thread loops: spin_phase() burns N µs of CPU, sleep_phase() sleeps
 * N µs in nanosleep. Equal phases (default 10 ms each) spend half the wall
 * time on CPU and half off; short phases (e.g. 50 µs) make a
 * context-switch-heavy workload. At exit it prints
 *   cycles=<spin+sleep cycles> wall_s=<seconds> cycles_per_s=<rate>
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static long spin_us = 10000, sleep_us = 10000;
static double seconds = 0;
static volatile unsigned long sink;
static unsigned long cycles; /* all threads, atomically */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

NOINLINE void spin_phase(void) {
    double end = now() + spin_us / 1e6;
    unsigned long x = sink;
    while (now() < end)
        for (int i = 0; i < 1000; i++)
            x = x * 6364136223846793005UL + 1;
    sink = x;
}

NOINLINE void sleep_phase(void) {
    struct timespec ts = {sleep_us / 1000000, (sleep_us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static void *run(void *arg) {
    (void)arg;
    double start = now();
    while (seconds <= 0 || now() - start < seconds) {
        spin_phase();
        sleep_phase();
        __atomic_fetch_add(&cycles, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--spin-us") && i + 1 < argc)
            spin_us = atol(argv[++i]);
        else if (!strcmp(argv[i], "--sleep-us") && i + 1 < argc)
            sleep_us = atol(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: sleepspin [--spin-us N] [--sleep-us N] [--seconds S] [--threads N]\n");
            return 2;
        }
    }
    if (spin_us < 0 || sleep_us < 0 || threads < 1 || threads > 64) {
        fprintf(stderr, "sleepspin: bad arguments\n");
        return 2;
    }
    printf("sleepspin pid %d spin %ld us sleep %ld us\n", getpid(), spin_us, sleep_us);
    fflush(stdout);
    pthread_t tids[64];
    double start = now();
    for (int t = 1; t < threads; t++)
        pthread_create(&tids[t], NULL, run, NULL);
    run(NULL);
    for (int t = 1; t < threads; t++)
        pthread_join(tids[t], NULL);
    double wall = now() - start;
    unsigned long n = __atomic_load_n(&cycles, __ATOMIC_RELAXED);
    printf("cycles=%lu wall_s=%.3f cycles_per_s=%.0f\n", n, wall, n / wall);
    return 0;
}
