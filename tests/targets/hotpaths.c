/* Two hot paths in a known CPU ratio, for end-to-end profiler tests.
 *
 *   hotpaths [--ratio A:B] [--shared-leaf] [--seconds N] [--threads N]
 *            [--late-threads N --late-after S] [--measure FILE]
 *
 * main -> path_a -> hot_a burns A units of work for every B units burnt by
 * main -> path_b -> hot_b. With --shared-leaf both paths reach one leaf,
 * `shared_leaf`, so only a full stack (the caller) tells them apart: the
 * case that frame-pointer-less (-O2) unwinding gets wrong. --late-threads
 * starts more workers (named "late-worker") S seconds after start: a
 * profiler attached before then must still see them. --measure keeps, in
 * FILE, the first worker's own CPU time in hot_a and in hot_b (thread CPU
 * clock around each call, ns, rewritten after every round): the split a
 * profile should show, as this machine (or an emulator) really ran it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static int shared_leaf_mode;
static unsigned ratio_a = 3, ratio_b = 1;

#define NOINLINE __attribute__((noinline))

/* An opaque call inside each hot loop makes the hot functions non-leaf, so
 * a frame-pointer build really sets up their frames (gcc drops the frame of
 * leaf functions even with -fno-omit-frame-pointer). */
NOINLINE void checkpoint(void) { __asm__ volatile("" ::: "memory"); }

/* One unit of work is ~50 µs of integer arithmetic the compiler cannot drop.
 * Each function gets its own constant so identical-code folding cannot merge
 * them into one symbol. */
#define BURN(units, mult)                                      \
    unsigned long x = sink;                                    \
    for (unsigned long i = 0; i < (units) * 20000; i++) {      \
        x = x * (mult) + 1442695040888963407UL;                \
        __asm__ volatile("" : "+r"(x));                        \
        if ((i & 4095) == 0)                                   \
            checkpoint();                                      \
    }                                                          \
    return x;

NOINLINE unsigned long shared_leaf(unsigned long units) { BURN(units, 6364136223846793005UL) }
NOINLINE unsigned long hot_a(unsigned long units) { BURN(units, 2862933555777941757UL) }
NOINLINE unsigned long hot_b(unsigned long units) { BURN(units, 3202034522624059733UL) }

NOINLINE void path_a(void) {
    sink += shared_leaf_mode ? shared_leaf(ratio_a) : hot_a(ratio_a);
    __asm__ volatile("" ::: "memory"); /* keep the call from becoming a tail call */
}

NOINLINE void path_b(void) {
    sink += shared_leaf_mode ? shared_leaf(ratio_b) : hot_b(ratio_b);
    __asm__ volatile("" ::: "memory");
}

static double seconds_limit = 0;
static int measure_fd = -1;
static unsigned long long measured[2];

static unsigned long long thread_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* One round, timed: each path's thread CPU time added to measured[]. */
static void measured_round(void) {
    unsigned long long t0 = thread_ns();
    path_a();
    unsigned long long t1 = thread_ns();
    path_b();
    unsigned long long t2 = thread_ns();
    measured[0] += t1 - t0;
    measured[1] += t2 - t1;
    char line[64];
    int n = snprintf(line, sizeof line, "%20llu %20llu\n", measured[0], measured[1]);
    if (pwrite(measure_fd, line, (size_t)n, 0) != n)
        perror("hotpaths: --measure");
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* arg: non-NULL for the first worker, the one --measure times. */
static void *worker(void *arg) {
    int timed = arg != NULL && measure_fd >= 0;
    double start = now();
    for (;;) {
        if (timed) {
            measured_round();
        } else {
            path_a();
            path_b();
        }
        if (seconds_limit > 0 && now() - start >= seconds_limit)
            break;
    }
    return NULL;
}

static void *late_starter(void *arg) {
    double *spec = arg; /* [0] = count, [1] = delay */
    usleep((useconds_t)(spec[1] * 1e6));
    for (int t = 0; t < (int)spec[0]; t++) {
        pthread_t tid;
        pthread_create(&tid, NULL, worker, NULL);
        pthread_setname_np(tid, "late-worker");
        pthread_detach(tid);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = 1;
    static double late[2] = {0, 1};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ratio") && i + 1 < argc) {
            if (sscanf(argv[++i], "%u:%u", &ratio_a, &ratio_b) != 2 || !ratio_a || !ratio_b) {
                fprintf(stderr, "hotpaths: --ratio wants A:B (positive)\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--shared-leaf")) {
            shared_leaf_mode = 1;
        } else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
            seconds_limit = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--late-threads") && i + 1 < argc) {
            late[0] = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--late-after") && i + 1 < argc) {
            late[1] = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--measure") && i + 1 < argc) {
            measure_fd = open(argv[++i], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            if (measure_fd < 0) {
                perror("hotpaths: --measure");
                return 2;
            }
        } else {
            fprintf(stderr, "usage: hotpaths [--ratio A:B] [--shared-leaf] [--seconds N] [--threads N]"
                            " [--late-threads N --late-after S] [--measure FILE]\n");
            return 2;
        }
    }
    printf("hotpaths pid %d ratio %u:%u%s\n", getpid(), ratio_a, ratio_b,
           shared_leaf_mode ? " shared-leaf" : "");
    fflush(stdout);
    pthread_t tids[64];
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    for (int t = 1; t < threads; t++)
        pthread_create(&tids[t], NULL, worker, NULL);
    if (late[0] > 0) {
        pthread_t starter;
        pthread_create(&starter, NULL, late_starter, late);
        pthread_detach(starter);
    }
    static int first;
    worker(&first);
    for (int t = 1; t < threads; t++)
        pthread_join(tids[t], NULL);
    return 0;
}
