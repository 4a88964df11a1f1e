// A malloc-heavy loop: small allocations freed again, as fast as it can;
// prints `ops N` (malloc+free pairs in the last second) every second.
//
//   mallocloop [--seconds N] [--size BYTES]
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void *alloc_one(size_t n) {
    char *p = malloc(n);
    if (p) p[0] = 1;
    return p;
}

int main(int argc, char **argv) {
    double seconds = 10;
    size_t size = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = (size_t)atol(argv[i + 1]);
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    double start = now(), mark = start;
    unsigned long ops = 0;
    for (;;) {
        for (int i = 0; i < 1000; i++) free(alloc_one(size));
        ops += 1000;
        double t = now();
        if (t - mark >= 1.0) {
            printf("ops %lu\n", ops);
            fflush(stdout);
            ops = 0;
            mark = t;
        }
        if (t - start >= seconds) return 0;
    }
}
