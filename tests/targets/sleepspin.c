/* Alternates spinning and sleeping, for off-CPU and wall-clock profiles.
 *
 *   sleepspin [--spin-us N | --spin-iters N] [--sleep-us N] [--seconds S] [--threads N]
 *             [--wait-start] [--counter FILE]
 *
 * Each thread loops: spin_phase() burns N µs of its own CPU time (so being
 * preempted does not shorten it), or with --spin-iters a fixed amount of
 * work (what a benchmark needs: any cost added to the thread then shows as
 * fewer cycles per second), and sleep_phase() sleeps
 * N µs in nanosleep. Equal phases (default 10 ms each) spend half the wall
 * time on CPU and half off; short phases (e.g. 50 µs) make a
 * context-switch-heavy workload. With --wait-start the threads run at once
 * but the measured window (of --seconds) starts at SIGUSR1, so a benchmark
 * can attach a profiler first. With --counter the cycle count lives in the
 * first 64 bits of FILE (mapped shared), for a benchmark to read at will.
 * At exit it prints
 *   cycles=<spin+sleep cycles> wall_s=<seconds> cycles_per_s=<rate>
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

static long spin_us = 10000, sleep_us = 10000, spin_iters = 0;
static double seconds = 0;
static volatile unsigned long sink;
static unsigned long local_cycles;
static unsigned long *cycles = &local_cycles; /* all threads, atomically */
static volatile sig_atomic_t stop, started = 1;

static void on_start(int sig) { (void)sig; started = 1; }
static void on_stop(int sig) { (void)sig; stop = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

NOINLINE void spin_phase(void) {
    unsigned long x = sink;
    if (spin_iters > 0) {
        for (long i = 0; i < spin_iters; i++)
            x = x * 6364136223846793005UL + 1;
        sink = x;
        return;
    }
    double end = thread_cpu() + spin_us / 1e6;
    /* ~50 µs of work between clock reads (a syscall for this clock), so
     * the time is spent here and not in clock_gettime. */
    while (thread_cpu() < end)
        for (int i = 0; i < 50000; i++)
            x = x * 6364136223846793005UL + 1;
    sink = x;
}

NOINLINE void sleep_phase(void) {
    struct timespec ts = {sleep_us / 1000000, (sleep_us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* The measured window, kept by the main thread between its own cycles
 * (it is worker 0: a separate timekeeping thread would add sleeps of its
 * own to an off-CPU profile). */
static unsigned long window_cycles;
static double window_start, window_s;

static void keep_window(void) {
    if (!started)
        return;
    double t = now();
    if (window_start == 0) {
        window_start = t;
        window_cycles = __atomic_load_n(cycles, __ATOMIC_RELAXED);
    } else if (seconds > 0 && t - window_start >= seconds) {
        stop = 1;
    }
    window_s = t - window_start;
}

static void *run(void *arg) {
    int is_main = arg != NULL;
    while (!stop) {
        spin_phase();
        sleep_phase();
        __atomic_fetch_add(cycles, 1, __ATOMIC_RELAXED);
        if (is_main)
            keep_window();
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--spin-us") && i + 1 < argc)
            spin_us = atol(argv[++i]);
        else if (!strcmp(argv[i], "--spin-iters") && i + 1 < argc)
            spin_iters = atol(argv[++i]);
        else if (!strcmp(argv[i], "--sleep-us") && i + 1 < argc)
            sleep_us = atol(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--wait-start"))
            started = 0;
        else if (!strcmp(argv[i], "--counter") && i + 1 < argc) {
            int fd = open(argv[++i], O_RDWR | O_CREAT, 0600);
            void *p = MAP_FAILED;
            if (fd < 0 || ftruncate(fd, 4096) < 0 ||
                (p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
                perror(argv[i]);
                return 1;
            }
            close(fd);
            cycles = p;
        } else {
            fprintf(stderr, "usage: sleepspin [--spin-us N | --spin-iters N] [--sleep-us N] [--seconds S] [--threads N]"
                            " [--wait-start] [--counter FILE]\n");
            return 2;
        }
    }
    if (spin_us < 0 || sleep_us < 0 || threads < 1 || threads > 64) {
        fprintf(stderr, "sleepspin: bad arguments\n");
        return 2;
    }
    /* Handlers before the banner: whoever reads it may signal at once. */
    signal(SIGUSR1, on_start);
    signal(SIGINT, on_stop);
    signal(SIGTERM, on_stop);
    printf("sleepspin pid %d spin %ld us sleep %ld us\n", getpid(), spin_us, sleep_us);
    fflush(stdout);
    pthread_t tids[64];
    for (int t = 1; t < threads; t++)
        pthread_create(&tids[t], NULL, run, NULL);
    run(&threads); /* worker 0, keeps the window */
    for (int t = 1; t < threads; t++)
        pthread_join(tids[t], NULL);
    unsigned long n = __atomic_load_n(cycles, __ATOMIC_RELAXED) - window_cycles;
    double wall = window_s;
    printf("cycles=%lu wall_s=%.3f cycles_per_s=%.0f\n", n, wall, n / wall);
    return 0;
}
