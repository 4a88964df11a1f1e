// Two allocators at the same byte rate, one thread each: `keep_block`
// keeps every block it allocates (a leak), `churn_block` frees them again
// (a ring of four blocks: its memory is reused, it does not grow).
//
//   memleak [--rate MB_PER_S] [--block KIB] [--seconds N] [--max-mb MB]
//
// Each block is touched page by page, so it becomes resident. The keeper
// stops keeping at --max-mb (default 1024) to stay bounded.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double rate_mb = 4.0;
static size_t block = 64 * 1024;
static double seconds = 0;
static size_t max_mb = 1024;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void touch(char *p, size_t n) {
    for (size_t i = 0; i < n; i += 4096) {
        ((volatile char *)p)[i] = (char)i;
    }
}

static void *kept_head;
static size_t kept_bytes;

__attribute__((noinline)) void keep_block(void) {
    char *p = malloc(block);
    if (!p) return;
    touch(p, block);
    if (kept_bytes + block > max_mb << 20) {
        free(p);
        return;
    }
    *(void **)p = kept_head;
    kept_head = p;
    kept_bytes += block;
}

static char *ring[4];
static unsigned ring_at;

__attribute__((noinline)) void churn_block(void) {
    unsigned i = ring_at++ % 4;
    free(ring[i]);
    ring[i] = malloc(block);
    if (ring[i]) touch(ring[i], block);
}

// Paces `fn` at rate_mb MB/s for `seconds` (forever when 0).
static void paced(void (*fn)(void)) {
    double per = (double)block / (rate_mb * 1024 * 1024);
    double start = now(), next = start;
    for (;;) {
        fn();
        next += per;
        double t = now();
        if (seconds > 0 && t - start >= seconds) return;
        if (next > t) {
            struct timespec ts = {(time_t)(next - t), (long)((next - t - (time_t)(next - t)) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
}

__attribute__((noinline)) void *keeper_thread(void *arg) {
    (void)arg;
    paced(keep_block);
    return NULL;
}

__attribute__((noinline)) void *churner_thread(void *arg) {
    (void)arg;
    paced(churn_block);
    return NULL;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rate")) rate_mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--block")) block = (size_t)atol(argv[i + 1]) * 1024;
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--max-mb")) max_mb = (size_t)atol(argv[i + 1]);
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (rate_mb <= 0 || block < 4096) {
        fprintf(stderr, "bad --rate or --block\n");
        return 2;
    }
    pthread_t k, c;
    pthread_create(&k, NULL, keeper_thread, NULL);
    pthread_create(&c, NULL, churner_thread, NULL);
    printf("ready pid %d\n", getpid());
    fflush(stdout);
    pthread_join(k, NULL);
    pthread_join(c, NULL);
    printf("kept %zu MiB\n", kept_bytes >> 20);
    return 0;
}
