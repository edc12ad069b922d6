/* What another process can do to memory and fds it shares with us, made harmless.
 *
 * Guest RAM is a file the front-end shares with us.  If the front-end shrinks that file
 * under our mapping, or the file is a sparse one on a full tmpfs, the next access to a
 * page that has no backing raises SIGBUS in whichever thread touched it: the kick lane,
 * the C drain on the event loop, or plain Python reading a memoryview.  None of them can
 * be unwound safely from a signal handler (Python least of all), so the handler does not
 * unwind: it puts a private zero page over the faulting page and returns.  The access is
 * retried, finds memory, and reads zeros or writes into the private page; the fault is
 * counted on the guarded range it hit.  Whoever touched the memory looks at the count
 * afterwards and drops that session (see backend/dataplane/guard.py and kick_lane.c).  Wayland
 * compositors guard clients' shared-memory pools the same way.
 *
 * The handler acts only on faults the kernel raised (si_code > 0) at an address inside a
 * guarded range.  A SIGBUS sent with kill() or tgkill() is counted and ignored: it must
 * not end a process that serves every VM on the host.  Any other fault goes to the
 * handler that was installed before ours, or ends the process as it always would have.
 *
 * Eventfds are shared with the front-end too, and O_NONBLOCK belongs to the file
 * description the front-end holds as well: it can clear it, and fill the counter to its
 * maximum, so that a write of ours would block the thread that serves every VM.
 * vuc_eventfd_signal() arms a per-thread timer around the write; the timer's signal,
 * installed without SA_RESTART, interrupts a write that blocks.  Reads need no timer:
 * preadv2(RWF_NOWAIT) never blocks on an eventfd (Linux 5.12+), whatever its flags.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* Ranges guarded at once: the regions of every session, at most 32 each (memory.py
 * MAX_REGIONS).  16384 held them for only 512 sessions: on a host of 1,000 VMs, VMs that
 * each mapped their allowed 32 regions would have taken every entry, and the next VM to
 * connect would have lost its session.  65536 is the kernel's default limit on a process's
 * mappings (vm.max_map_count, 65530), which every region is one of: the table is never the
 * first limit.  Entries are zero-filled BSS, resident only up to the high-water mark, and
 * the scans below stop there. */
#define GUARD_MAX 65536

typedef struct {
    uintptr_t start, end; /* end == 0: a free entry */
    uint64_t faults;
} guard_range;

static guard_range ranges[GUARD_MAX];
static uint32_t high;         /* entries [0, high) may be in use */
static uint64_t fault_epoch;  /* faults in every range, ever: the cheap "did anything happen" */
static uint64_t stray_sigbus; /* SIGBUS sent by a process, ignored */
static uint64_t unguarded;    /* a fault in a guarded range that could not be patched over */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction prev_sigbus;
static int installed;
static int timer_signo; /* 0: no timer signal of our own, writes are poll-checked only */
static pthread_key_t timer_key;

/* Put a private zero page over the page holding ``addr``, inside the mapping [lo, hi)
 * (lo page-aligned, as mmap returns it).  Tries the base page first, then the huge page
 * sizes a hugetlbfs mapping may use. */
static int patch(uintptr_t addr, uintptr_t lo, uintptr_t hi) {
    static const uintptr_t sizes[] = {0, 2u << 20, 1u << 30};
    uintptr_t base = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t top = (hi + base - 1) & ~(base - 1);
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uintptr_t size = sizes[i] ? sizes[i] : base;
        uintptr_t page = addr & ~(size - 1);
        if (page < lo || page + size > top)
            continue;
        void *p = mmap((void *)page, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p != MAP_FAILED)
            return 1;
    }
    return 0;
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    int saved = errno;
    if (info->si_code <= 0) { /* SI_USER, SI_QUEUE, SI_TKILL: sent, not raised by an access */
        __atomic_add_fetch(&stray_sigbus, 1, __ATOMIC_RELAXED);
        errno = saved;
        return;
    }
    uintptr_t a = (uintptr_t)info->si_addr;
    uint32_t n = __atomic_load_n(&high, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++) {
        uintptr_t s = __atomic_load_n(&ranges[i].start, __ATOMIC_ACQUIRE);
        uintptr_t e = __atomic_load_n(&ranges[i].end, __ATOMIC_ACQUIRE);
        if (e == 0 || a < s || a >= e)
            continue;
        if (patch(a, s, e)) {
            __atomic_add_fetch(&ranges[i].faults, 1, __ATOMIC_RELEASE);
            __atomic_add_fetch(&fault_epoch, 1, __ATOMIC_RELEASE);
            errno = saved;
            return;
        }
        __atomic_add_fetch(&unguarded, 1, __ATOMIC_RELAXED);
        break;
    }
    if (prev_sigbus.sa_flags & SA_SIGINFO) {
        if (prev_sigbus.sa_sigaction) {
            prev_sigbus.sa_sigaction(sig, info, ctx);
            return;
        }
    } else if (prev_sigbus.sa_handler != SIG_DFL && prev_sigbus.sa_handler != SIG_IGN) {
        prev_sigbus.sa_handler(sig);
        return;
    }
    /* Not ours: the default action.  Returning retries the access, which now ends the
     * process with SIGBUS, as it would have without us. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, NULL);
    errno = saved;
}

static void on_timer(int sig) { (void)sig; /* only here to interrupt a blocked write */ }

static void free_timer(void *t) {
    timer_delete((timer_t)t);
}

/* Install the handlers; idempotent.  Returns the timer signal in use (0: none free). */
int vuc_guard_install(void) {
    pthread_mutex_lock(&mu);
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, &prev_sigbus);
        /* A real-time signal nobody else handles; no SA_RESTART, so it interrupts write(). */
        for (int sig = SIGRTMAX - 2; sig > SIGRTMIN + 2 && !timer_signo; sig--) {
            struct sigaction cur;
            if (sigaction(sig, NULL, &cur) == 0 && !(cur.sa_flags & SA_SIGINFO) && cur.sa_handler == SIG_DFL) {
                struct sigaction t;
                memset(&t, 0, sizeof t);
                t.sa_handler = on_timer;
                sigemptyset(&t.sa_mask);
                if (sigaction(sig, &t, NULL) == 0)
                    timer_signo = sig;
            }
        }
        pthread_key_create(&timer_key, free_timer);
        installed = 1;
    }
    int sig = timer_signo;
    pthread_mutex_unlock(&mu);
    return sig;
}

/* Guard [start, start + len); returns the range's id, or -1 with errno ENOSPC. */
int32_t vuc_guard_add(const void *start, uint64_t len) {
    pthread_mutex_lock(&mu);
    for (uint32_t i = 0; i < GUARD_MAX; i++) {
        if (ranges[i].end != 0)
            continue;
        __atomic_store_n(&ranges[i].faults, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&ranges[i].start, (uintptr_t)start, __ATOMIC_RELEASE);
        __atomic_store_n(&ranges[i].end, (uintptr_t)start + len, __ATOMIC_RELEASE);
        if (i >= high)
            __atomic_store_n(&high, i + 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&mu);
        return (int32_t)i;
    }
    pthread_mutex_unlock(&mu);
    errno = ENOSPC;
    return -1;
}

/* Stop guarding a range: called once its memory is unmapped. */
void vuc_guard_remove(int32_t id) {
    if (id < 0 || id >= GUARD_MAX)
        return;
    pthread_mutex_lock(&mu);
    __atomic_store_n(&ranges[id].end, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&ranges[id].start, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&mu);
}

uint64_t vuc_guard_faults(int32_t id) {
    if (id < 0 || id >= GUARD_MAX)
        return 0;
    return __atomic_load_n(&ranges[id].faults, __ATOMIC_ACQUIRE);
}

/* Faults in any guarded range overlapping [start, start + len). */
uint64_t vuc_guard_faults_in(const void *start, uint64_t len) {
    uintptr_t lo = (uintptr_t)start, hi = lo + len;
    uint64_t n = 0;
    uint32_t top = __atomic_load_n(&high, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < top; i++) {
        uintptr_t s = __atomic_load_n(&ranges[i].start, __ATOMIC_ACQUIRE);
        uintptr_t e = __atomic_load_n(&ranges[i].end, __ATOMIC_ACQUIRE);
        if (e != 0 && s < hi && lo < e)
            n += __atomic_load_n(&ranges[i].faults, __ATOMIC_ACQUIRE);
    }
    return n;
}

/* epoch: faults patched over, ever; stray: SIGBUS sent by a process; fatal: faults in a
 * guarded range that could not be patched (then the previous disposition took over). */
void vuc_guard_stats(uint64_t *epoch, uint64_t *stray, uint64_t *fatal) {
    *epoch = __atomic_load_n(&fault_epoch, __ATOMIC_ACQUIRE);
    *stray = __atomic_load_n(&stray_sigbus, __ATOMIC_RELAXED);
    *fatal = __atomic_load_n(&unguarded, __ATOMIC_RELAXED);
}

uint64_t vuc_guard_epoch(void) { return __atomic_load_n(&fault_epoch, __ATOMIC_ACQUIRE); }

/* -- eventfds the front-end shares ------------------------------------------------------ */

/* A write to an eventfd either returns at once or sleeps until the reader reads: any wait
 * at all means the counter was kept full on purpose. */
#define WRITE_PATIENCE_NS 2000000L

static timer_t *thread_timer(void) {
    static __thread timer_t timer;
    static __thread int state; /* 0: not tried, 1: have one, -1: none */
    if (state == 0) {
        struct sigevent sev;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = timer_signo;
        sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
        state = timer_signo && timer_create(CLOCK_MONOTONIC, &sev, &timer) == 0 ? 1 : -1;
        if (state == 1)
            pthread_setspecific(timer_key, (void *)timer);
    }
    return state == 1 ? &timer : NULL;
}

/* Add one to an eventfd without ever blocking for long.  Returns 1 when written, 0 when
 * the counter is at its maximum (the reader has a wake-up pending anyway), -EINTR when the
 * write had to be interrupted (the file description was made blocking and kept full),
 * -errno on any other failure. */
int vuc_eventfd_signal(int fd) {
    uint64_t one = 1;
    timer_t *t = thread_timer();
    if (!t) {
        /* No timer signal of our own: make the description non-blocking first.  Only a
         * front-end that clears it again between these two calls can still stall us. */
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && !(fl & O_NONBLOCK))
            fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        ssize_t n = write(fd, &one, sizeof one);
        return n == sizeof one ? 1 : errno == EAGAIN ? 0 : -errno;
    }
    struct itimerspec on = {.it_value = {.tv_sec = 0, .tv_nsec = WRITE_PATIENCE_NS}};
    struct itimerspec off;
    memset(&off, 0, sizeof off);
    timer_settime(*t, 0, &on, NULL);
    ssize_t n = write(fd, &one, sizeof one);
    int err = errno;
    timer_settime(*t, 0, &off, NULL);
    if (n == sizeof one)
        return 1;
    if (err == EAGAIN)
        return 0;
    if (err == EINTR) {
        /* Stalled on purpose: give the description its O_NONBLOCK back for next time. */
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0)
            fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    }
    return -err;
}

/* Read an eventfd's counter without blocking, whatever its flags: the count, 0 when it
 * was zero, -errno on failure (-EOPNOTSUPP before Linux 5.12). */
int64_t vuc_eventfd_drain(int fd) {
    uint64_t v = 0;
    struct iovec iov = {.iov_base = &v, .iov_len = sizeof v};
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    if (n == sizeof v)
        return (int64_t)(v > INT64_MAX ? INT64_MAX : v);
    if (n < 0 && errno == EAGAIN)
        return 0;
    return n < 0 ? -errno : -EIO;
}
