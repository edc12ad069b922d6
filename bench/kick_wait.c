/* The guest model's kick and its wait for the ack, in C: the bench's "C kick" arm.
 *
 * The guest model publishes its request in Python as always; only the last step, the
 * eventfd write and the block for the used-buffer interrupt, is done here, as the C
 * floor's parent (eventfd_rtt.c) does it.  Comparing this arm with the Python kick on
 * the same back-end separates what the Python guest model adds to a request's
 * kick -> decision figure (it runs on between its write and its block, on the CPU where
 * the back-end's lane may be woken) from what the back-end takes.
 */
#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Write 1 to ``kick_fd`` and wait up to ``timeout_ms`` for ``call_fd`` to become readable
 * (it is not read).  out[0]: the time right before the write; out[1]: when the wait
 * returned with the fd readable, 0 on a timeout.  Returns 0, or -1 if the write failed. */
int vuc_bench_kick_wait(int kick_fd, int call_fd, int timeout_ms, int64_t out[2]) {
    uint64_t one = 1;
    struct pollfd p = {.fd = call_fd, .events = POLLIN};
    out[0] = now_ns();
    if (write(kick_fd, &one, sizeof one) != sizeof one)
        return -1;
    out[1] = poll(&p, 1, timeout_ms) == 1 ? now_ns() : 0;
    return 0;
}
