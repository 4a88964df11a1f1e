/* logcaster-load: load client for logcaster (and the real LogCaster).
 *
 *   logcaster-load [--host 127.0.0.1] [--port 9999] [--connections 4]
 *                  [--rate LINES_PER_SEC] [--duration SECONDS]
 *                  [--search-rate PER_SEC] [--pattern ERROR]
 *                  [--churn] [--reset] [--client-closes-first]
 *                  [--timeout-ms 2000]
 *
 * --connections senders share --rate lines per second (total; 0: as fast as
 * possible) for --duration seconds. Lines look like application logs; one in
 * ten is an ERROR. --search-rate adds a searcher sending "SEARCH <pattern>"
 * and reading the answer up to its "END" line.
 *
 * By default each sender keeps one connection and streams. With --churn every
 * request (a line or a search) is a new connection: connect, send, then wait
 * for the server to close first (reading until EOF, at most --timeout-ms), or
 * with --client-closes-first close right away. --reset closes with SO_LINGER
 * 0 (a RST, so neither side keeps a TIME_WAIT socket).
 *
 * Latency: a line's is the time its send() took (the time to connect, send
 * and close with --churn); a search's is the round trip to its END line.
 *
 * At the end it prints one line on stdout:
 *   lines=N lines_per_sec=R searches=N search_results=N connects=N errors=N
 *   timeouts=N p50_us=N p99_us=N max_us=N search_p50_us=N search_p99_us=N
 *   duration_s=S
 * Exit status 0 unless it could not run at all.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTIONS 1024
#define MAX_BATCH 64 /* lines per send() when behind schedule */

static const char *opt_host = "127.0.0.1";
static int opt_port = 9999, opt_connections = 4, opt_timeout_ms = 2000;
static double opt_rate = 1000, opt_duration = 5, opt_search_rate = 0;
static const char *opt_pattern = "ERROR";
static bool opt_churn, opt_reset, opt_client_closes_first;

static struct sockaddr_in server;
static double t_start, t_end;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double t) {
    struct timespec ts = {(time_t)t, (long)((t - (time_t)t) * 1e9)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* ---- latency histogram: log-linear, 64 buckets per power of two (~1.5 %) ---- */
#define HIST_BUCKETS (64 + 58 * 64)

struct hist {
    uint64_t count[HIST_BUCKETS];
    uint64_t n, max;
};

static int bucket_of(uint64_t us) {
    if (us < 64)
        return (int)us;
    int e = 63 - __builtin_clzll(us); /* >= 6 */
    return 64 + (e - 6) * 64 + (int)((us >> (e - 6)) & 63);
}

static uint64_t value_of(int b) {
    if (b < 64)
        return (uint64_t)b;
    int e = (b - 64) / 64 + 6;
    return (uint64_t)(64 + (b - 64) % 64) << (e - 6);
}

static void hist_add(struct hist *h, uint64_t us) {
    h->count[bucket_of(us)]++;
    h->n++;
    if (us > h->max)
        h->max = us;
}

static void hist_merge(struct hist *into, const struct hist *h) {
    for (int b = 0; b < HIST_BUCKETS; b++)
        into->count[b] += h->count[b];
    into->n += h->n;
    if (h->max > into->max)
        into->max = h->max;
}

static uint64_t hist_pct(const struct hist *h, double pct) {
    if (h->n == 0)
        return 0;
    uint64_t rank = (uint64_t)(pct / 100.0 * (double)h->n);
    if (rank >= h->n)
        rank = h->n - 1;
    uint64_t seen = 0;
    for (int b = 0; b < HIST_BUCKETS; b++) {
        seen += h->count[b];
        if (seen > rank)
            return value_of(b);
    }
    return h->max;
}

/* ---- per-thread state ---- */
struct worker {
    pthread_t tid;
    int index;
    double rate; /* requests per second for this thread; 0: unlimited */
    bool searcher;
    uint64_t scheduled;   /* lines due so far (pacing) */
    uint64_t lines;       /* lines sent */
    uint64_t searches, search_results, connects, errors, timeouts;
    struct hist lat;
};

/* ---- connections ---- */
static int open_connection(struct worker *w) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        w->errors++;
        return -1;
    }
    /* Bounded blocking calls: a stuck server must not hang the client. */
    struct timeval tv = {opt_timeout_ms / 1000, (opt_timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0) {
        if (errno == EINPROGRESS || errno == EAGAIN || errno == ETIMEDOUT)
            w->timeouts++;
        else
            w->errors++;
        close(fd);
        return -1;
    }
    w->connects++;
    return fd;
}

static void close_connection(int fd) {
    if (opt_reset) {
        struct linger lg = {1, 0}; /* close() sends a RST: no TIME_WAIT anywhere */
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(fd);
}

static bool send_all(struct worker *w, int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t s = send(fd, p, n, MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                w->timeouts++;
            else
                w->errors++;
            return false;
        }
        p += s;
        n -= (size_t)s;
    }
    return true;
}

/* Churn: waits for the server to close first (EOF), then closes. */
static void await_server_close(struct worker *w, int fd) {
    char sink[4096];
    for (;;) {
        ssize_t n = recv(fd, sink, sizeof sink, 0);
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                w->timeouts++;
            else
                w->errors++;
        }
        return;
    }
}

/* ---- log lines ---- */
static size_t format_line(char *out, size_t cap, uint64_t seq, int conn) {
    static const char *const levels[10] = {"ERROR", "WARN", "WARN", "DEBUG", "INFO",
                                           "INFO",  "INFO", "INFO", "INFO",  "INFO"};
    static const char *const paths[4] = {"/api/v1/items", "/api/v1/users", "/login", "/api/v1/orders"};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(out, cap,
                     "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s [conn-%d] req=%llu user=%llu path=%s "
                     "status=%d latency_ms=%llu\n",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, levels[seq % 10], conn, (unsigned long long)seq,
                     (unsigned long long)((seq * 2654435761u) % 100000), paths[seq % 4],
                     seq % 10 == 0 ? 500 : 200, (unsigned long long)(seq * 7 % 250));
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

/* ---- searches ---- */
/* Sends one SEARCH and reads the answer up to "END <n>"; false on failure. */
static bool do_search(struct worker *w, int fd) {
    char req[512];
    int rn = snprintf(req, sizeof req, "SEARCH %s\n", opt_pattern);
    if (rn <= 0 || (size_t)rn >= sizeof req || !send_all(w, fd, req, (size_t)rn))
        return false;
    /* The answer ends with "END <n>\n" at the start of a line. Keep a small
     * tail of what was read so the marker is found across reads. */
    char buf[65536];
    size_t keep = 0;
    bool line_start = true;
    for (;;) {
        ssize_t n = recv(fd, buf + keep, sizeof buf - keep - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                w->timeouts++;
            else
                w->errors++;
            return false;
        }
        size_t len = keep + (size_t)n;
        buf[len] = '\0';
        /* Scan complete lines. */
        size_t start = 0;
        char *nl;
        while ((nl = memchr(buf + start, '\n', len - start)) != NULL) {
            if (line_start && strncmp(buf + start, "END", 3) == 0) {
                w->search_results += strtoull(buf + start + 3, NULL, 10);
                w->searches++;
                return true;
            }
            line_start = true;
            start = (size_t)(nl - buf) + 1;
        }
        /* An incomplete line: keep up to 64 bytes of it (enough for END). */
        size_t rest = len - start;
        if (rest > 64) {
            line_start = false;
            keep = 0;
        } else {
            memmove(buf, buf + start, rest);
            keep = rest;
        }
    }
}

/* ---- threads ---- */
static void *sender(void *arg) {
    struct worker *w = arg;
    char batch[MAX_BATCH * 512];
    uint64_t seq = (uint64_t)w->index << 40; /* distinct per connection */
    int fd = -1;
    double next_retry = 0;
    while (now_s() < t_end) {
        /* How many lines are due by now. */
        uint64_t due = MAX_BATCH;
        if (w->rate > 0) {
            double elapsed = now_s() - t_start;
            uint64_t target = (uint64_t)(elapsed * w->rate);
            if (target <= w->scheduled) {
                double next = t_start + (double)(w->scheduled + 1) / w->rate;
                sleep_until(next < t_end ? next : t_end);
                continue;
            }
            due = target - w->scheduled;
            if (due > MAX_BATCH)
                due = MAX_BATCH;
        }
        if (opt_churn) {
            /* A new connection per line. */
            double t0 = now_s();
            w->scheduled++; /* a failed request is skipped, not retried */
            int c = open_connection(w);
            if (c < 0)
                continue;
            size_t n = format_line(batch, sizeof batch, seq++, w->index);
            bool ok = send_all(w, c, batch, n);
            if (ok && !opt_client_closes_first)
                await_server_close(w, c);
            close_connection(c);
            if (ok) {
                w->lines++;
                hist_add(&w->lat, (uint64_t)((now_s() - t0) * 1e6));
            }
            continue;
        }
        if (fd < 0) {
            if (now_s() < next_retry) {
                sleep_until(next_retry);
                continue;
            }
            fd = open_connection(w);
            if (fd < 0) {
                next_retry = now_s() + 0.05;
                continue;
            }
        }
        size_t n = 0;
        for (uint64_t i = 0; i < due; i++)
            n += format_line(batch + n, sizeof batch - n, seq++, w->index);
        double t0 = now_s();
        if (!send_all(w, fd, batch, n)) {
            close_connection(fd);
            fd = -1;
            continue;
        }
        hist_add(&w->lat, (uint64_t)((now_s() - t0) * 1e6));
        w->scheduled += due;
        w->lines += due;
    }
    if (fd >= 0)
        close_connection(fd);
    return NULL;
}

static void *searcher(void *arg) {
    struct worker *w = arg;
    int fd = -1;
    uint64_t attempts = 0;
    while (now_s() < t_end) {
        double next = t_start + (double)attempts / w->rate;
        if (next > now_s()) {
            sleep_until(next < t_end ? next : t_end);
            continue;
        }
        attempts++;
        double t0 = now_s();
        if (opt_churn) {
            int c = open_connection(w);
            if (c < 0)
                continue;
            bool ok = do_search(w, c);
            if (ok && !opt_client_closes_first)
                await_server_close(w, c);
            close_connection(c);
            if (ok)
                hist_add(&w->lat, (uint64_t)((now_s() - t0) * 1e6));
            continue;
        }
        if (fd < 0 && (fd = open_connection(w)) < 0)
            continue;
        if (do_search(w, fd)) {
            hist_add(&w->lat, (uint64_t)((now_s() - t0) * 1e6));
        } else {
            close_connection(fd);
            fd = -1;
        }
    }
    if (fd >= 0)
        close_connection(fd);
    return NULL;
}

static void usage(void) {
    fprintf(stderr,
            "usage: logcaster-load [--host ADDR] [--port N] [--connections N] [--rate LINES_PER_SEC]\n"
            "                      [--duration S] [--search-rate PER_SEC] [--pattern P] [--churn]\n"
            "                      [--reset] [--client-closes-first] [--timeout-ms N]\n");
    exit(2);
}

static double parse_num(const char *s, double min, double max) {
    char *end;
    double v = strtod(s, &end);
    if (*end || end == s || v < min || v > max)
        usage();
    return v;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--churn")) {
            opt_churn = true;
            continue;
        }
        if (!strcmp(a, "--reset")) {
            opt_reset = true;
            continue;
        }
        if (!strcmp(a, "--client-closes-first")) {
            opt_client_closes_first = true;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host"))
            opt_host = v;
        else if (!strcmp(a, "--port"))
            opt_port = (int)parse_num(v, 1, 65535);
        else if (!strcmp(a, "--connections"))
            opt_connections = (int)parse_num(v, 0, MAX_CONNECTIONS);
        else if (!strcmp(a, "--rate"))
            opt_rate = parse_num(v, 0, 1e9);
        else if (!strcmp(a, "--duration"))
            opt_duration = parse_num(v, 0.01, 1e7);
        else if (!strcmp(a, "--search-rate"))
            opt_search_rate = parse_num(v, 0, 1e6);
        else if (!strcmp(a, "--pattern"))
            opt_pattern = v;
        else if (!strcmp(a, "--timeout-ms"))
            opt_timeout_ms = (int)parse_num(v, 1, 3600000);
        else
            usage();
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &server.sin_addr) != 1) {
        fprintf(stderr, "logcaster-load: --host wants an IPv4 address, not %s\n", opt_host);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    int nworkers = opt_connections + (opt_search_rate > 0 ? 1 : 0);
    if (nworkers == 0)
        usage();
    struct worker *workers = calloc((size_t)nworkers, sizeof *workers);
    if (!workers) {
        perror("logcaster-load: calloc");
        return 1;
    }
    t_start = now_s();
    t_end = t_start + opt_duration;
    for (int i = 0; i < nworkers; i++) {
        struct worker *w = &workers[i];
        w->index = i;
        w->searcher = i == opt_connections;
        w->rate = w->searcher ? opt_search_rate : opt_rate / opt_connections;
        int err = pthread_create(&w->tid, NULL, w->searcher ? searcher : sender, w);
        if (err) {
            fprintf(stderr, "logcaster-load: pthread_create: %s\n", strerror(err));
            return 1;
        }
    }
    struct hist *lines_lat = calloc(1, sizeof *lines_lat), *search_lat = calloc(1, sizeof *search_lat);
    if (!lines_lat || !search_lat) {
        perror("logcaster-load: calloc");
        return 1;
    }
    uint64_t lines = 0, searches = 0, results = 0, connects = 0, errors = 0, timeouts = 0;
    for (int i = 0; i < nworkers; i++) {
        struct worker *w = &workers[i];
        pthread_join(w->tid, NULL);
        hist_merge(w->searcher ? search_lat : lines_lat, &w->lat);
        if (!w->searcher)
            lines += w->lines;
        searches += w->searches;
        results += w->search_results;
        connects += w->connects;
        errors += w->errors;
        timeouts += w->timeouts;
    }
    uint64_t sent = lines;
    double elapsed = now_s() - t_start;
    printf("lines=%llu lines_per_sec=%.1f searches=%llu search_results=%llu connects=%llu errors=%llu "
           "timeouts=%llu p50_us=%llu p99_us=%llu max_us=%llu search_p50_us=%llu search_p99_us=%llu "
           "duration_s=%.2f\n",
           (unsigned long long)sent, (double)sent / opt_duration, (unsigned long long)searches,
           (unsigned long long)results, (unsigned long long)connects, (unsigned long long)errors,
           (unsigned long long)timeouts, (unsigned long long)hist_pct(lines_lat, 50),
           (unsigned long long)hist_pct(lines_lat, 99), (unsigned long long)lines_lat->max,
           (unsigned long long)hist_pct(search_lat, 50), (unsigned long long)hist_pct(search_lat, 99),
           elapsed);
    fflush(stdout);
    return 0;
}
