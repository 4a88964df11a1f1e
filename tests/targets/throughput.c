/* A CPU-bound target that reports its throughput, for overhead benchmarks.
 *
 *   throughput [--seconds N] [--threads N] [--working-set KiB] [--wait-start]
 *              [--counter FILE]
 *
 * With --wait-start the workers run at once (warm caches, stable clocks) but
 * the measured window starts only at SIGUSR1, so a benchmark can attach a
 * profiler first and measure only while it is attached. With --counter the
 * operation counters live in FILE (mapped shared, one 64-bit counter per
 * thread every 64 bytes): a benchmark reads them whenever it likes, and can
 * compare windows with and without a profiler in one long-lived process,
 * without a thread or a syscall added to the target.
 *
 * Each thread walks a private working set (default 512 KiB, so caches matter
 * as they do in real servers) through a few call levels, counting
 * operations. At exit it prints one line:
 *   ops=<total> wall_s=<seconds> cpu_s=<process CPU seconds> ops_per_s=<rate>
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile sig_atomic_t stop, started = 1;
static size_t ws_words = 512 * 1024 / sizeof(unsigned long);

struct worker {
    pthread_t tid;
    unsigned long *ops; /* own slot, or a slot of the --counter file */
    unsigned long local_ops;
    unsigned long *mem;
    unsigned long seed;
};

NOINLINE static unsigned long mix(unsigned long *mem, unsigned long i, unsigned long x) {
    unsigned long j = (x >> 7) % ws_words;
    mem[j] += x ^ i;
    return x * 6364136223846793005UL + mem[(j * 31) % ws_words];
}

NOINLINE static unsigned long batch(unsigned long *mem, unsigned long x) {
    for (unsigned long i = 0; i < 1000; i++)
        x = mix(mem, i, x);
    return x;
}

NOINLINE static void *run(void *arg) {
    struct worker *w = arg;
    /* A fixed seed (not an address, which ASLR moves): every run does the
     * same work, so runs of different processes compare. */
    unsigned long x = w->seed;
    while (!stop) {
        x = batch(w->mem, x);
        __atomic_fetch_add(w->ops, 1000, __ATOMIC_RELAXED); /* read by main */
    }
    w->mem[0] = x;
    return NULL;
}

static double now(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void on_signal(int sig) { (void)sig; stop = 1; }
static void on_start(int sig) { (void)sig; started = 1; }

int main(int argc, char **argv) {
    double seconds = 5;
    int threads = 1;
    const char *counter_file = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--working-set") && i + 1 < argc)
            ws_words = (size_t)atol(argv[++i]) * 1024 / sizeof(unsigned long);
        else if (!strcmp(argv[i], "--wait-start"))
            started = 0;
        else if (!strcmp(argv[i], "--counter") && i + 1 < argc)
            counter_file = argv[++i];
        else {
            fprintf(stderr, "usage: throughput [--seconds N] [--threads N] [--working-set KiB] [--wait-start]"
                            " [--counter FILE]\n");
            return 2;
        }
    }
    if (threads < 1 || threads > 64 || ws_words < 64) {
        fprintf(stderr, "throughput: bad --threads or --working-set\n");
        return 2;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGUSR1, on_start);
    unsigned long *shared = NULL;
    if (counter_file) {
        int fd = open(counter_file, O_RDWR | O_CREAT, 0600);
        if (fd < 0 || ftruncate(fd, 4096) < 0 ||
            (shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
            perror(counter_file);
            return 1;
        }
        close(fd);
    }
    struct worker *ws = calloc(threads, sizeof *ws);
    for (int t = 0; t < threads; t++) {
        ws[t].ops = shared ? &shared[t * 8] : &ws[t].local_ops;
        ws[t].seed = 0x9E3779B97F4A7C15UL * (unsigned long)(t + 1);
        ws[t].mem = calloc(ws_words, sizeof(unsigned long));
        if (!ws[t].mem) {
            perror("calloc");
            return 1;
        }
    }
    for (int t = 0; t < threads; t++)
        pthread_create(&ws[t].tid, NULL, run, &ws[t]);
    printf("throughput pid %d threads %d\n", getpid(), threads);
    fflush(stdout);
    while (!started && !stop)
        usleep(1000);
    /* The window: ops counted from here (each counter only grows). */
    unsigned long ops0 = 0;
    for (int t = 0; t < threads; t++)
        ops0 += __atomic_load_n(ws[t].ops, __ATOMIC_RELAXED);
    double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
    while (!stop && now(CLOCK_MONOTONIC) - w0 < seconds)
        usleep(10000);
    unsigned long ops = 0;
    for (int t = 0; t < threads; t++)
        ops += __atomic_load_n(ws[t].ops, __ATOMIC_RELAXED);
    ops -= ops0;
    double wall = now(CLOCK_MONOTONIC) - w0, cpu = now(CLOCK_PROCESS_CPUTIME_ID) - c0;
    stop = 1;
    for (int t = 0; t < threads; t++)
        pthread_join(ws[t].tid, NULL);
    printf("ops=%lu wall_s=%.3f cpu_s=%.3f ops_per_s=%.0f\n", ops, wall, cpu, ops / wall);
    return 0;
}
