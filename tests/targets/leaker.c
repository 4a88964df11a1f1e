/* leaker: allocates memory and never frees it, for the OOM-kill test.
 *
 *   leaker [--chunk-kib 1024] [--every-ms 5]
 *
 * Prints "leaker pid PID ready" on stdout, waits for a line on stdin (so a
 * test can move it into a memory-limited cgroup and start watching it
 * first), then allocates and touches a --chunk-kib chunk every --every-ms
 * milliseconds in leak_chunk() until it is killed. Exits 0 at end of input
 * without a line. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static long opt_chunk_kib = 1024, opt_every_ms = 5;

/* One chunk, written so that it is resident. */
NOINLINE void *leak_chunk(size_t bytes) {
    char *p = malloc(bytes);
    if (p)
        memset(p, 0x5a, bytes);
    return p;
}

static long parse_long(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || end == s || v < 0) {
        fprintf(stderr, "usage: leaker [--chunk-kib N] [--every-ms N]\n");
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--chunk-kib"))
            opt_chunk_kib = parse_long(argv[i + 1]);
        else if (!strcmp(argv[i], "--every-ms"))
            opt_every_ms = parse_long(argv[i + 1]);
        else
            parse_long("");
    }
    printf("leaker pid %d ready\n", (int)getpid());
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 0;
    struct timespec nap = {opt_every_ms / 1000, (opt_every_ms % 1000) * 1000000L};
    for (;;) {
        if (!leak_chunk((size_t)opt_chunk_kib * 1024))
            fprintf(stderr, "leaker: malloc failed\n");
        nanosleep(&nap, NULL);
    }
}
