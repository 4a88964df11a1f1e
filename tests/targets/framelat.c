/* A 60 Hz game-style loop whose frame function is probed by the latency tests.
 *
 *   framelat [--frames N] [--hz HZ] [--work-ms MS] [--slow-ms MS] [--slow-every N]
 *            [--lock] [--wait-start] [--out FILE]
 *
 * Each frame calls tick(), which runs update_world() for --work-ms (default
 * 2 ms); every --slow-every-th frame (default 10) physics_step() makes the
 * tick last --slow-ms in all (default 30 ms): the slow system. Both spin on
 * the monotonic clock, so a tick lasts its wall time whatever else runs.
 * The loop sleeps to the next frame's deadline (60 Hz), or goes on at once
 * when late. It measures every tick() itself and, at exit (after --frames,
 * default 600, or SIGTERM), writes one duration in ns per line to --out.
 * With --lock the slow frames are late on a lock instead: tick() calls
 * wait_for_assets(), which waits for world_lock while the asset_loader
 * thread holds it for --slow-ms (sleeping): a frame late off CPU.
 * With --wait-start the loop begins at SIGUSR1 (a probe can attach first).
 * It prints "framelat ready pid=<pid>" when started.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile sig_atomic_t stop, started = 1;
static volatile unsigned long sink;
static long work_ns = 2000000, slow_ns = 30000000, slow_every = 10;
static unsigned long frame_no;
static int lock_mode;
static pthread_mutex_t world_lock = PTHREAD_MUTEX_INITIALIZER;
static sem_t load_go, load_locked;

static void on_start(int sig) { (void)sig; started = 1; }
static void on_stop(int sig) { (void)sig; stop = 1; }

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Inlined into each system, so that its frame is the system's own. */
static inline __attribute__((always_inline)) void spin_until(long long end) {
    unsigned long x = sink;
    while (now_ns() < end)
        for (int i = 0; i < 200; i++)
            x = x * 6364136223846793005UL + 1442695040888963407UL;
    sink = x;
}

/* The usual frame's work. */
NOINLINE void update_world(long long start) { spin_until(start + work_ns); }

/* The slow system: what makes every slow_every-th frame late. */
NOINLINE void physics_step(long long start) { spin_until(start + slow_ns); }

/* The loader: on each go, holds world_lock for slow_ns, asleep. */
static void *asset_loader(void *arg) {
    (void)arg;
    for (;;) {
        sem_wait(&load_go);
        pthread_mutex_lock(&world_lock);
        sem_post(&load_locked);
        struct timespec ts = { slow_ns / 1000000000L, slow_ns % 1000000000L };
        nanosleep(&ts, NULL);
        pthread_mutex_unlock(&world_lock);
    }
    return NULL;
}

/* The lock-late system: waits for the world the loader holds. */
NOINLINE void wait_for_assets(void) {
    sem_post(&load_go);
    sem_wait(&load_locked);
    pthread_mutex_lock(&world_lock);
    pthread_mutex_unlock(&world_lock);
}

/* The frame function the tests probe. */
NOINLINE void tick(void) {
    long long start = now_ns();
    update_world(start);
    if (frame_no % slow_every == slow_every - 1) {
        if (lock_mode)
            wait_for_assets();
        else
            physics_step(start);
    }
    frame_no++;
}

int main(int argc, char **argv) {
    long frames = 600, hz = 60;
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--frames") && v) frames = atol(argv[++i]);
        else if (!strcmp(a, "--hz") && v) hz = atol(argv[++i]);
        else if (!strcmp(a, "--work-ms") && v) work_ns = (long)(atof(argv[++i]) * 1e6);
        else if (!strcmp(a, "--slow-ms") && v) slow_ns = (long)(atof(argv[++i]) * 1e6);
        else if (!strcmp(a, "--slow-every") && v) slow_every = atol(argv[++i]);
        else if (!strcmp(a, "--out") && v) out = argv[++i];
        else if (!strcmp(a, "--wait-start")) started = 0;
        else if (!strcmp(a, "--lock")) lock_mode = 1;
        else { fprintf(stderr, "framelat: unknown argument %s\n", a); return 2; }
    }
    if (hz <= 0 || frames <= 0 || slow_every <= 0) return 2;
    if (lock_mode) {
        pthread_t t;
        sem_init(&load_go, 0, 0);
        sem_init(&load_locked, 0, 0);
        if (pthread_create(&t, NULL, asset_loader, NULL)) return 1;
    }
    signal(SIGUSR1, on_start);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    long long *times = calloc((size_t)frames, sizeof *times);
    if (!times) return 1;
    printf("framelat ready pid=%d\n", getpid());
    fflush(stdout);
    while (!started && !stop) pause();
    long long period = 1000000000LL / hz, next = now_ns();
    long n = 0;
    while (n < frames && !stop) {
        long long t0 = now_ns();
        tick();
        times[n++] = now_ns() - t0;
        next += period;
        long long now = now_ns();
        if (next > now) {
            struct timespec ts = { next / 1000000000LL, next % 1000000000LL };
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        } else {
            next = now;
        }
    }
    if (out) {
        FILE *f = fopen(out, "w");
        if (!f) return 1;
        for (long i = 0; i < n; i++) fprintf(f, "%lld\n", times[i]);
        fclose(f);
    }
    printf("frames=%ld\n", n);
    return 0;
}
