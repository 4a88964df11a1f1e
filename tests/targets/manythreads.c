/* A process with thousands of threads, one of them busy: what a thread-per-
 * connection server looks like to a profiler that opens one perf event per
 * thread.
 *
 *   manythreads [--threads N] [--seconds S]
 *
 * N-1 threads (small stacks) block in idle_wait() on a condition variable
 * that is never signalled; one thread, named "busy-worker", spins in
 * busy_worker(). It prints "ready threads=N busy_tid=T" once every thread
 * runs, then lives for S seconds (default 60).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static pthread_cond_t counted = PTHREAD_COND_INITIALIZER;
static int running;
static volatile long busy_tid;
static volatile unsigned long sink;

static NOINLINE void *idle_wait(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    running++;
    pthread_cond_signal(&counted);
    for (;;)
        pthread_cond_wait(&never, &lock);
    return NULL;
}

static NOINLINE unsigned long spin_step(unsigned long x) {
    for (int i = 0; i < 1000; i++)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
    return x;
}

static NOINLINE void *busy_worker(void *arg) {
    (void)arg;
    busy_tid = syscall(SYS_gettid);
    pthread_setname_np(pthread_self(), "busy-worker");
    pthread_mutex_lock(&lock);
    running++;
    pthread_cond_signal(&counted);
    pthread_mutex_unlock(&lock);
    unsigned long x = 1;
    for (;;)
        sink = x = spin_step(x);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = 3000;
    double seconds = 60;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int i = 0; i < threads - 2; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, idle_wait, NULL) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    pthread_t busy;
    pthread_create(&busy, &attr, busy_worker, NULL);
    pthread_mutex_lock(&lock);
    while (running < threads - 1)
        pthread_cond_wait(&counted, &lock);
    pthread_mutex_unlock(&lock);
    printf("ready threads=%d busy_tid=%ld\n", threads, busy_tid);
    fflush(stdout);
    usleep((useconds_t)(seconds * 1e6));
    return 0;
}
