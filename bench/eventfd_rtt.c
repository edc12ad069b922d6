/* eventfd round trip between two processes: the floor for a kick and its ack.
 *
 * usage: eventfd_rtt N GAP_US WARMUP [CROSS]
 *
 * The parent ("guest") writes eventfd A and blocks reading eventfd B; the
 * child ("device") blocks reading A, stamps CLOCK_MONOTONIC into shared
 * memory and writes B.  Between pings the parent sleeps GAP_US, so the child
 * is asleep in read() when the ping comes, as an idle back-end is.
 * Prints one line per sample after WARMUP pings: "rtt_ns oneway_ns", where
 * oneway is child's wake-up stamp minus the parent's stamp just before its write.
 * With CROSS=1 the parent is pinned to CPU 0 and the child to CPU 1, so every
 * wake-up is of an idle CPU: what a responder placed away from its waker pays.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STOP 1000000ULL

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s N GAP_US WARMUP\n", argv[0]);
        return 2;
    }
    long n = atol(argv[1]), gap_us = atol(argv[2]), warmup = atol(argv[3]);
    int cross = argc > 4 && atoi(argv[4]);
    int a = eventfd(0, EFD_CLOEXEC), b = eventfd(0, EFD_CLOEXEC);
    volatile uint64_t *stamp = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (a < 0 || b < 0 || stamp == MAP_FAILED) {
        perror("setup");
        return 1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0) {
        uint64_t v, one = 1;
        if (cross)
            pin(1);
        for (;;) {
            if (read(a, &v, 8) != 8) _exit(1);
            stamp[0] = now_ns();
            if (v >= STOP) _exit(0);
            if (write(b, &one, 8) != 8) _exit(1);
        }
    }
    if (cross)
        pin(0);
    uint64_t one = 1, v;
    struct timespec gap = {gap_us / 1000000, (gap_us % 1000000) * 1000};
    for (long i = 0; i < n + warmup; i++) {
        if (gap_us > 0) nanosleep(&gap, NULL);
        uint64_t t0 = now_ns();
        if (write(a, &one, 8) != 8) return 1;
        if (read(b, &v, 8) != 8) return 1;
        uint64_t t1 = now_ns();
        if (i >= warmup) printf("%llu %llu\n", (unsigned long long)(t1 - t0), (unsigned long long)(stamp[0] - t0));
    }
    uint64_t stop = STOP;
    if (write(a, &stop, 8) != 8) return 1;
    waitpid(pid, NULL, 0);
    return 0;
}
