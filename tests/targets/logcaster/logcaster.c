/* logcaster: a small stand-in for the LogCaster log server, with the
 * incidents its operators documented built in (see
 * shared/seeds/README.md beside the repository, cases 1-4 and 6).
 *
 *   logcaster [--port 9999] [--health-port 8080] [--workers 8]
 *             [--buffer-lines 10000] [--drain-rate LINES_PER_SEC]
 *             [--log-file PATH] [--incident NAME] [--incident-after SECONDS]
 *
 * Log port: clients stream newline-terminated log lines. "SEARCH <pattern>"
 * answers every retained line containing <pattern> (at most MAX_RESULTS, one
 * per line), then "END <count>".
 * Health port: any HTTP request gets a JSON object with status, uptime,
 * connections, logs_processed, dropped, buffer usage, searches...
 *
 * Threads, as in the original:
 * - main: accept_loop, select() on the listening socket, hands accepted
 *   sockets to the worker pool through a queue;
 * - worker-N: handle_client, one connection at a time: buffer_push for a
 *   line, search_logs for a SEARCH; every line also goes through
 *   update_stats (stats mutex). A connection keeps its worker until it
 *   closes: clients beyond --workers wait in the queue;
 * - log-writer: log_writer drains the buffer to the log file (persisting),
 *   which is what frees buffer slots;
 * - stats: stats_reporter, once a second: lines/s and buffer high-water mark;
 * - health: health_loop, the HTTP health endpoint;
 * - incident: turns the incident on after --incident-after seconds.
 *
 * Incidents (--incident):
 *   busy-loop  case 1: accept_loop calls select() with a zero timeout and
 *              spins (one core at 100 %).
 *   leak       case 2: search results are never freed.
 *   overflow   case 3: the log writer slows down to --drain-rate lines/s (a
 *              slow disk; default 500); with no backpressure the buffer fills
 *              at peak and lines are dropped ("Buffer full" on stderr,
 *              "dropped" in the health JSON). Without it the writer keeps up
 *              with millions of lines/s.
 *   deadlock   case 4: a worker takes buffer -> stats while the stats thread
 *              takes stats -> buffer; both park in pthread_mutex_lock forever
 *              and the rest of the server piles up behind them.
 *   timewait   case 6: the server closes every connection first, right after
 *              answering one request, so TIME_WAIT sockets pile up on its port.
 *   crash      the level parser (parse_level, called by ingest_line) lost its
 *              check for a line without a "LEVEL:" header: the first malformed
 *              line (no ':' in its first 16 bytes) dereferences NULL, SIGSEGV.
 *
 * Prints one line on stdout when it listens:
 *   logcaster pid PID port PORT health HEALTH_PORT
 * and "logcaster: incident NAME on" on stderr when the incident starts.
 * SIGINT/SIGTERM: stops and exits 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

#define LINE_CAP 240          /* bytes kept of one log line (longer ones are cut) */
#define MAX_RESULTS 1000      /* search results returned at most */
#define RECV_BUF (64 * 1024)  /* per-connection receive buffer */
#define MAX_WORKERS 64
#define QUEUE_CAP 1024        /* accepted sockets waiting for a worker */
#define WRITER_BATCH 256      /* lines the log writer takes per lock */

enum incident { INC_NONE, INC_BUSY_LOOP, INC_LEAK, INC_OVERFLOW, INC_DEADLOCK, INC_TIMEWAIT, INC_CRASH };
static const char *const incident_names[] = {"none", "busy-loop", "leak", "overflow", "deadlock", "timewait", "crash"};

/* ---- configuration ---- */
static int opt_port = 9999, opt_health_port = 8080, opt_workers = 8;
static long opt_buffer_lines = 10000, opt_drain_rate = 500;
static double opt_incident_after = 0;
static const char *opt_log_file = "/dev/null";
static enum incident opt_incident = INC_NONE;

static volatile sig_atomic_t running = 1;
static atomic_bool incident_active;
static atomic_ulong unparsed_lines; /* lines without a level (crash incident) */
static struct timespec start_time;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double uptime_s(void) {
    return now_s() - (start_time.tv_sec + start_time.tv_nsec / 1e9);
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Whether `which` is the configured incident and it has started. */
static bool incident_on(enum incident which) {
    return opt_incident == which && atomic_load_explicit(&incident_active, memory_order_relaxed);
}

/* ---- the log buffer ----
 * A ring of fixed-size slots. `head` counts lines ever stored, `persisted`
 * lines the log writer has written out: slots older than `persisted` may be
 * reused, so the ring keeps the last `cap` lines for searches, and a line is
 * dropped only when every slot holds a line not yet persisted ("Buffer full":
 * the original has no backpressure). */
struct entry {
    uint64_t ts_ms;
    uint32_t len;
    char text[LINE_CAP];
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t nonempty; /* signalled when a line is stored */
    struct entry *slots;
    uint64_t cap, head, persisted;
    uint64_t high_water; /* most lines ever waiting for the writer */
} buffer = {.mu = PTHREAD_MUTEX_INITIALIZER, .nonempty = PTHREAD_COND_INITIALIZER};

/* ---- statistics, under their own mutex as in the original ---- */
static struct {
    pthread_mutex_t mu;
    uint64_t logs_processed, dropped, searches, search_results, total_connections, rejected;
    int connections;
    double lines_per_sec;      /* over the last second, by stats_reporter */
    uint64_t buffer_high_water; /* as of the last second, by stats_reporter */
} stats = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* the log file is best effort here */
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Sends everything; false when the peer is gone. */
static bool send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static uint64_t wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Stores one line; the caller holds buffer.mu. False when the buffer is full. */
static bool buffer_store_locked(const char *line, size_t len) {
    if (buffer.head - buffer.persisted >= buffer.cap)
        return false;
    struct entry *e = &buffer.slots[buffer.head % buffer.cap];
    if (len >= LINE_CAP)
        len = LINE_CAP - 1;
    memcpy(e->text, line, len);
    e->text[len] = '\0';
    e->len = (uint32_t)len;
    e->ts_ms = wall_ms();
    buffer.head++;
    if (buffer.head - buffer.persisted > buffer.high_water)
        buffer.high_water = buffer.head - buffer.persisted;
    pthread_cond_signal(&buffer.nonempty);
    return true;
}

/* Stores one line under the buffer mutex. */
NOINLINE bool buffer_push(const char *line, size_t len) {
    pthread_mutex_lock(&buffer.mu);
    bool stored = buffer_store_locked(line, len);
    pthread_mutex_unlock(&buffer.mu);
    return stored;
}

/* Lines held, lines not yet persisted, and the most ever not persisted. */
static void buffer_usage(uint64_t *used, uint64_t *pending, uint64_t *high_water) {
    pthread_mutex_lock(&buffer.mu);
    *used = buffer.head < buffer.cap ? buffer.head : buffer.cap;
    *pending = buffer.head - buffer.persisted;
    if (high_water)
        *high_water = buffer.high_water;
    pthread_mutex_unlock(&buffer.mu);
}

/* Counts one line, stored or dropped. */
NOINLINE void update_stats(bool stored) {
    pthread_mutex_lock(&stats.mu);
    if (stored)
        stats.logs_processed++;
    else
        stats.dropped++;
    pthread_mutex_unlock(&stats.mu);
}

static void update_connections(int delta) {
    pthread_mutex_lock(&stats.mu);
    stats.connections += delta;
    if (delta > 0)
        stats.total_connections++;
    pthread_mutex_unlock(&stats.mu);
}

/* "Buffer full" at most once a second, as a real server would rate-limit it. */
static void report_drop(void) {
    static _Atomic uint64_t last_report_s;
    static atomic_ulong since_report;
    unsigned long n = atomic_fetch_add(&since_report, 1) + 1;
    uint64_t now = (uint64_t)uptime_s();
    uint64_t last = atomic_load(&last_report_s);
    if (now > last && atomic_compare_exchange_strong(&last_report_s, &last, now)) {
        atomic_fetch_sub(&since_report, n);
        fprintf(stderr, "logcaster: Buffer full, dropped %lu log lines\n", n);
    }
}

/* The level of a "LEVEL: message" line: its length, or -1 for a line
 * without the header (stored as it is). The crash incident: the check for
 * a missing separator is gone, and a malformed line dereferences NULL. */
NOINLINE int parse_level(const char *line, size_t len) {
    const char *sep = memchr(line, ':', len < 16 ? len : 16);
    bool checked = !incident_on(INC_CRASH);
    if (checked && sep == NULL)
        return -1;
    /* volatile: the compiler must not turn the bug into a trap. */
    if (*(const volatile char *)sep != ':')
        return -1;
    return (int)(sep - line);
}

/* One log line from a client. */
NOINLINE void ingest_line(const char *line, size_t len) {
    bool stored;
    /* Only the crash incident's servers parse levels: the others keep the
     * profiles their tests measure. */
    if (opt_incident == INC_CRASH && parse_level(line, len) < 0)
        atomic_fetch_add_explicit(&unparsed_lines, 1, memory_order_relaxed);
    if (incident_on(INC_DEADLOCK)) {
        /* Case 4: the line is counted while the buffer lock is still held
         * (buffer -> stats) while stats_reporter takes stats -> buffer. The
         * nap stands for work done under the lock; it widens the window so
         * the inversion deadlocks within a second instead of once a week. */
        pthread_mutex_lock(&buffer.mu);
        nap_ms(20);
        stored = buffer_store_locked(line, len);
        update_stats(stored);
        pthread_mutex_unlock(&buffer.mu);
    } else {
        stored = buffer_push(line, len);
        update_stats(stored);
    }
    if (!stored)
        report_drop();
}

/* The retained lines containing `pattern`, oldest first, each allocated:
 * the caller frees them with free_search_results(). */
NOINLINE char **search_logs(const char *pattern, int *count) {
    char **results = malloc(sizeof(char *) * MAX_RESULTS);
    *count = 0;
    if (!results)
        return NULL;
    size_t plen = strlen(pattern);
    pthread_mutex_lock(&buffer.mu);
    uint64_t held = buffer.head < buffer.cap ? buffer.head : buffer.cap;
    for (uint64_t i = buffer.head - held; i < buffer.head && *count < MAX_RESULTS; i++) {
        const struct entry *e = &buffer.slots[i % buffer.cap];
        if (memmem(e->text, e->len, pattern, plen)) {
            char *copy = strndup(e->text, e->len);
            if (!copy)
                break;
            results[(*count)++] = copy;
        }
    }
    pthread_mutex_unlock(&buffer.mu);
    return results;
}

void free_search_results(char **results, int count) {
    for (int i = 0; i < count; i++)
        free(results[i]);
    free(results);
}

/* Answers "SEARCH <pattern>"; false when the client is gone. */
NOINLINE bool answer_search(int fd, const char *pattern) {
    int count = 0;
    char **results = search_logs(pattern, &count);
    if (!results)
        return send_all(fd, "ERROR out of memory\n", 20);
    /* One send for the whole answer: a line per result, then END. */
    size_t total = 32;
    for (int i = 0; i < count; i++)
        total += strlen(results[i]) + 1;
    char *out = malloc(total);
    bool ok = out != NULL;
    if (out) {
        size_t n = 0;
        for (int i = 0; i < count; i++) {
            size_t l = strlen(results[i]);
            memcpy(out + n, results[i], l);
            out[n + l] = '\n';
            n += l + 1;
        }
        n += (size_t)snprintf(out + n, total - n, "END %d\n", count);
        ok = send_all(fd, out, n);
        free(out);
    }
    pthread_mutex_lock(&stats.mu);
    stats.searches++;
    stats.search_results += (uint64_t)count;
    pthread_mutex_unlock(&stats.mu);
    /* Case 2: with the leak the results are never freed. */
    if (!incident_on(INC_LEAK))
        free_search_results(results, count);
    return ok;
}

/* One request line (without its newline); false to close the connection.
 * Named and out of line: the per-line function the preset's probe times. */
NOINLINE bool handle_request(int fd, char *line, size_t len) {
    if (len > 0 && line[len - 1] == '\r')
        len--;
    if (len == 0)
        return true;
    bool ok;
    if (len >= 6 && memcmp(line, "SEARCH", 6) == 0 && (len == 6 || line[6] == ' ')) {
        line[len] = '\0';
        ok = answer_search(fd, len > 7 ? line + 7 : "");
    } else {
        ingest_line(line, len);
        ok = true;
    }
    /* Case 6: the server closes first after every request. */
    return ok && !incident_on(INC_TIMEWAIT);
}

/* Serves one client connection until it closes. */
NOINLINE void handle_client(int fd, char *buf) {
    size_t len = 0;
    bool skipping = false; /* inside the rest of an over-long line */
    for (;;) {
        ssize_t n = recv(fd, buf + len, RECV_BUF - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        len += (size_t)n;
        size_t start = 0;
        char *nl;
        while ((nl = memchr(buf + start, '\n', len - start)) != NULL) {
            size_t l = (size_t)(nl - (buf + start));
            bool keep = skipping || handle_request(fd, buf + start, l);
            skipping = false;
            start += l + 1;
            if (!keep)
                return;
        }
        memmove(buf, buf + start, len - start);
        len -= start;
        if (len == RECV_BUF) {
            /* A line longer than the buffer: keep its start, skip the rest. */
            if (!skipping && !handle_request(fd, buf, len))
                return;
            skipping = true;
            len = 0;
        }
    }
}

/* ---- worker pool ---- */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t nonempty;
    int fds[QUEUE_CAP];
    int head, count;
    int active[MAX_WORKERS]; /* socket each worker serves, -1 when idle */
} queue = {.mu = PTHREAD_MUTEX_INITIALIZER, .nonempty = PTHREAD_COND_INITIALIZER};

static bool enqueue_connection(int fd) {
    pthread_mutex_lock(&queue.mu);
    bool ok = queue.count < QUEUE_CAP;
    if (ok) {
        queue.fds[(queue.head + queue.count) % QUEUE_CAP] = fd;
        queue.count++;
        pthread_cond_signal(&queue.nonempty);
    }
    pthread_mutex_unlock(&queue.mu);
    return ok;
}

void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg;
    char *buf = malloc(RECV_BUF + 1); /* + 1: room for a terminating NUL */
    if (!buf) {
        perror("logcaster: malloc");
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&queue.mu);
        while (queue.count == 0 && running) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += 200000000L; /* wake now and then to notice shutdown */
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&queue.nonempty, &queue.mu, &until);
        }
        if (!running) {
            pthread_mutex_unlock(&queue.mu);
            break;
        }
        int fd = queue.fds[queue.head];
        queue.head = (queue.head + 1) % QUEUE_CAP;
        queue.count--;
        queue.active[id] = fd;
        pthread_mutex_unlock(&queue.mu);

        update_connections(+1);
        handle_client(fd, buf);
        update_connections(-1);

        pthread_mutex_lock(&queue.mu);
        queue.active[id] = -1; /* before close: main must not shut down a reused fd */
        pthread_mutex_unlock(&queue.mu);
        close(fd);
    }
    free(buf);
    return NULL;
}

/* ---- accept loop (main thread) ---- */
NOINLINE void accept_loop(int listen_fd) {
    while (running) {
        fd_set read_fds;
        FD_ZERO(&read_fds);
        FD_SET(listen_fd, &read_fds);
        struct timeval timeout = {0, 100000}; /* 100 ms: the fix from case 1 */
        if (incident_on(INC_BUSY_LOOP))
            timeout.tv_usec = 0; /* case 1: select() never blocks, the loop spins */
        int ready = select(listen_fd + 1, &read_fds, NULL, NULL, &timeout);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("logcaster: select");
            return;
        }
        if (ready == 0 || !FD_ISSET(listen_fd, &read_fds))
            continue;
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                perror("logcaster: accept");
            continue;
        }
        if (!enqueue_connection(fd)) {
            close(fd);
            pthread_mutex_lock(&stats.mu);
            stats.rejected++;
            pthread_mutex_unlock(&stats.mu);
        }
    }
}

/* ---- log writer: persists lines, which frees their slots ---- */
NOINLINE void *log_writer(void *arg) {
    (void)arg;
    int out = open(opt_log_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (out < 0) {
        perror(opt_log_file);
        exit(1);
    }
    char *chunk = malloc(WRITER_BATCH * (LINE_CAP + 24));
    if (!chunk) {
        perror("logcaster: malloc");
        exit(1);
    }
    while (running) {
        /* Under the overflow incident the "disk" takes --drain-rate lines/s:
         * a batch every 10 ms. */
        bool slow = incident_on(INC_OVERFLOW);
        uint64_t batch = slow ? (uint64_t)(opt_drain_rate / 100 > 0 ? opt_drain_rate / 100 : 1) : WRITER_BATCH;
        size_t n = 0;
        pthread_mutex_lock(&buffer.mu);
        if (buffer.persisted == buffer.head) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += 200000000L;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&buffer.nonempty, &buffer.mu, &until);
        }
        while (buffer.persisted < buffer.head && batch-- > 0) {
            const struct entry *e = &buffer.slots[buffer.persisted % buffer.cap];
            n += (size_t)sprintf(chunk + n, "%llu ", (unsigned long long)e->ts_ms);
            memcpy(chunk + n, e->text, e->len);
            n += e->len;
            chunk[n++] = '\n';
            buffer.persisted++;
        }
        pthread_mutex_unlock(&buffer.mu);
        if (n > 0)
            write_all(out, chunk, n);
        if (slow)
            nap_ms(10);
    }
    free(chunk);
    close(out);
    return NULL;
}

/* ---- stats reporter ---- */
NOINLINE void *stats_reporter(void *arg) {
    (void)arg;
    uint64_t prev = 0;
    double prev_t = now_s();
    while (running) {
        nap_ms(1000);
        uint64_t used, pending, high_water;
        double t = now_s();
        pthread_mutex_lock(&stats.mu);
        if (incident_on(INC_DEADLOCK)) {
            /* Case 4, the other half: stats -> buffer, to snapshot the
             * buffer consistently with the counters. */
            nap_ms(20);
            buffer_usage(&used, &pending, &high_water);
        } else {
            /* The fix: never hold both; read the buffer after unlocking. */
            pthread_mutex_unlock(&stats.mu);
            buffer_usage(&used, &pending, &high_water);
            pthread_mutex_lock(&stats.mu);
        }
        stats.lines_per_sec = (double)(stats.logs_processed - prev) / (t - prev_t);
        prev = stats.logs_processed;
        prev_t = t;
        stats.buffer_high_water = high_water;
        pthread_mutex_unlock(&stats.mu);
    }
    return NULL;
}

/* ---- health endpoint ---- */
NOINLINE int collect_health(char *out, size_t cap) {
    uint64_t used, pending;
    buffer_usage(&used, &pending, NULL); /* the high-water mark is the stats thread's snapshot */
    pthread_mutex_lock(&stats.mu);
    int n = snprintf(out, cap,
                     "{\"status\":\"healthy\",\"uptime\":%.0f,\"connections\":%d,"
                     "\"logs_processed\":%llu,\"dropped\":%llu,\"searches\":%llu,"
                     "\"search_results\":%llu,\"total_connections\":%llu,\"rejected\":%llu,"
                     "\"lines_per_sec\":%.1f,\"buffer_used\":%llu,\"buffer_pending\":%llu,"
                     "\"buffer_high_water\":%llu,\"buffer_capacity\":%llu,"
                     "\"incident\":\"%s\",\"incident_active\":%s}\n",
                     uptime_s(), stats.connections, (unsigned long long)stats.logs_processed,
                     (unsigned long long)stats.dropped, (unsigned long long)stats.searches,
                     (unsigned long long)stats.search_results, (unsigned long long)stats.total_connections,
                     (unsigned long long)stats.rejected, stats.lines_per_sec, (unsigned long long)used,
                     (unsigned long long)pending, (unsigned long long)stats.buffer_high_water,
                     (unsigned long long)buffer.cap, incident_names[opt_incident],
                     atomic_load(&incident_active) ? "true" : "false");
    pthread_mutex_unlock(&stats.mu);
    return n;
}

NOINLINE void serve_health(int fd) {
    /* Read the request head (whatever it is) so closing does not reset. */
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[4096];
    size_t got = 0;
    while (got < sizeof req - 1) {
        ssize_t n = recv(fd, req + got, sizeof req - 1 - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
        req[got] = '\0';
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
            break;
    }
    char body[1024], resp[1280];
    int blen = collect_health(body, sizeof body);
    if (blen < 0 || (size_t)blen >= sizeof body)
        return;
    int rlen = snprintf(resp, sizeof resp,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                        blen, body);
    if (rlen > 0 && (size_t)rlen < sizeof resp)
        send_all(fd, resp, (size_t)rlen);
}

NOINLINE void *health_loop(void *arg) {
    int listen_fd = (int)(intptr_t)arg;
    while (running) {
        fd_set read_fds;
        FD_ZERO(&read_fds);
        FD_SET(listen_fd, &read_fds);
        struct timeval timeout = {0, 200000};
        if (select(listen_fd + 1, &read_fds, NULL, NULL, &timeout) <= 0)
            continue;
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        serve_health(fd);
        close(fd);
    }
    return NULL;
}

/* ---- incident timer ---- */
static void *incident_timer(void *arg) {
    (void)arg;
    double until = now_s() + opt_incident_after;
    while (running && now_s() < until)
        nap_ms(50);
    if (!running)
        return NULL;
    atomic_store(&incident_active, true);
    fprintf(stderr, "logcaster: incident %s on\n", incident_names[opt_incident]);
    return NULL;
}

/* ---- setup ---- */
static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("logcaster: socket");
        exit(1);
    }
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        perror("logcaster: SO_REUSEADDR");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 512) < 0) {
        fprintf(stderr, "logcaster: listening on port %d: %s\n", port, strerror(errno));
        exit(1);
    }
    return fd;
}

static void start_thread(void *(*fn)(void *), void *arg, const char *name) {
    pthread_t tid;
    int err = pthread_create(&tid, NULL, fn, arg);
    if (err) {
        fprintf(stderr, "logcaster: pthread_create: %s\n", strerror(err));
        exit(1);
    }
    pthread_setname_np(tid, name);
    pthread_detach(tid);
}

static void on_signal(int sig) {
    (void)sig;
    running = 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: logcaster [--port N] [--health-port N] [--workers N] [--buffer-lines N]\n"
            "                 [--drain-rate LINES_PER_SEC] [--log-file PATH]\n"
            "                 [--incident busy-loop|leak|overflow|deadlock|timewait|crash]\n"
            "                 [--incident-after SECONDS]\n");
    exit(2);
}

static long parse_long(const char *s, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < min || v > max)
        usage();
    return v;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--port"))
            opt_port = (int)parse_long(v, 1, 65535);
        else if (!strcmp(a, "--health-port"))
            opt_health_port = (int)parse_long(v, 1, 65535);
        else if (!strcmp(a, "--workers"))
            opt_workers = (int)parse_long(v, 1, MAX_WORKERS);
        else if (!strcmp(a, "--buffer-lines"))
            opt_buffer_lines = parse_long(v, 16, 10000000);
        else if (!strcmp(a, "--drain-rate"))
            opt_drain_rate = parse_long(v, 1, 100000000);
        else if (!strcmp(a, "--log-file"))
            opt_log_file = v;
        else if (!strcmp(a, "--incident-after")) {
            char *end;
            opt_incident_after = strtod(v, &end);
            if (*end || end == v || opt_incident_after < 0)
                usage();
        } else if (!strcmp(a, "--incident")) {
            opt_incident = INC_NONE;
            for (size_t k = 1; k < sizeof incident_names / sizeof *incident_names; k++)
                if (!strcmp(v, incident_names[k]))
                    opt_incident = (enum incident)k;
            if (opt_incident == INC_NONE)
                usage();
        } else
            usage();
    }
    clock_gettime(CLOCK_MONOTONIC, &start_time);

    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    buffer.cap = (uint64_t)opt_buffer_lines;
    buffer.slots = malloc(buffer.cap * sizeof *buffer.slots);
    if (!buffer.slots) {
        perror("logcaster: buffer");
        return 1;
    }
    /* Touch the whole buffer now so RSS is flat from the start: growth
     * later on is a leak, not the buffer filling up. */
    memset(buffer.slots, 0, buffer.cap * sizeof *buffer.slots);
    for (int w = 0; w < MAX_WORKERS; w++)
        queue.active[w] = -1;

    int listen_fd = listen_on(opt_port);
    int health_fd = listen_on(opt_health_port);

    char name[24]; /* "worker-63" at most; the kernel keeps 15 characters */
    for (int w = 0; w < opt_workers; w++) {
        snprintf(name, sizeof name, "worker-%d", w);
        start_thread(worker_main, (void *)(intptr_t)w, name);
    }
    start_thread(log_writer, NULL, "log-writer");
    start_thread(stats_reporter, NULL, "stats");
    start_thread(health_loop, (void *)(intptr_t)health_fd, "health");
    if (opt_incident != INC_NONE)
        start_thread(incident_timer, NULL, "incident");

    printf("logcaster pid %d port %d health %d\n", getpid(), opt_port, opt_health_port);
    fflush(stdout);

    accept_loop(listen_fd);

    /* Shutdown: stop accepting, wake the workers out of recv(), give them a
     * moment, and exit even if some are stuck (the deadlock incident). */
    close(listen_fd);
    pthread_mutex_lock(&queue.mu);
    for (int w = 0; w < opt_workers; w++)
        if (queue.active[w] >= 0)
            shutdown(queue.active[w], SHUT_RDWR);
    pthread_cond_broadcast(&queue.nonempty);
    pthread_mutex_unlock(&queue.mu);
    nap_ms(100);
    if (pthread_mutex_trylock(&stats.mu) == 0) {
        fprintf(stderr, "logcaster: exiting: logs_processed=%llu dropped=%llu searches=%llu\n",
                (unsigned long long)stats.logs_processed, (unsigned long long)stats.dropped,
                (unsigned long long)stats.searches);
        pthread_mutex_unlock(&stats.mu);
    } else {
        fprintf(stderr, "logcaster: exiting (stats locked)\n");
    }
    return 0;
}
