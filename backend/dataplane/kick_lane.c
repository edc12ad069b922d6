/* The kick lane: guest kick -> drain -> clamp decision -> sched_setattr, in one C thread.
 *
 * Why: waking the asyncio loop and running the kick handler in Python costs
 * 100-200 us per kick (most of it a cache-cold interpreter), ten times an
 * eventfd round trip.  The lane serves every offloaded request queue of the
 * process from one thread that never touches Python: epoll on the rings' kick
 * eventfds, and for each kick the drain of ring_drain.c, the device's per-batch
 * bookkeeping (accounting.c), the clamp engine (engine.c), the actuation with
 * sched_setattr (actuators.c), the used-ring publication and the interrupt
 * (virtqueue.c), and the session's kick batching (kick_batcher.c).  Each of
 * those is the twin of a Python reference, in a file of its own named after it;
 * this file holds only the thread, its epoll loop and its slot table.
 *
 * Python stays the control plane.  It builds a vuc_slot (slot.h) per started
 * request queue, attaches it, and detaches it before it changes anything the
 * slot points at (ring, guest memory, fds, buffers).  Every access to a slot by
 * the lane happens under the lane mutex, and attach/detach take it, so after
 * vuc_lane_detach() returns the lane no longer looks at the slot.  epoll
 * events name slots by (table index, generation), never by pointer, so an
 * event for a slot detached meanwhile is dropped.  Counters are cumulative
 * u64s that Python reads (aligned loads, no tearing); rejections and clamp
 * errors are queued as events for Python to log (it wakes on notice_fd).
 *
 * Engine locking: see engine.h.  Order is always lane mutex, then engine mutex.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "slot.h"

/* ---- the lane ------------------------------------------------------------------------------ */

#define MAX_SLOTS 4096
#define WAKE_KEY UINT64_MAX

typedef struct vuc_lane {
    pthread_mutex_t mu;
    pthread_cond_t started;
    pthread_t thread;
    int epfd, wakefd, notice_fd;
    int stop;
    /* The lane thread's scheduling, set by the thread itself before it serves anything. */
    int ready;
    int32_t tid, slice_err;
    uint64_t slice_req, slice_ns; /* requested; read back after the request (0: none asked) */
    uint64_t woke_ns; /* when epoll_wait last returned: splits a stamped kick -> decision in two */
    vuc_slot *slot[MAX_SLOTS];
    uint32_t gen[MAX_SLOTS];
    uint32_t nslots; /* high-water mark of used indices */
    /* When housekeeping must next look at every slot: no slot's deadline is earlier than
     * next_due (it may be earlier than the nearest one, which costs one scan that finds
     * nothing), and any_again is set when a ring asked for another turn.  Between the two a
     * kick costs the lane its own slot, not a walk over every slot. */
    double next_due;
    int any_again;
} vuc_lane;

static uint64_t key_of(vuc_lane *l, int32_t id) { return (uint64_t)l->gen[id] << 32 | (uint32_t)id; }

static vuc_slot *slot_of(vuc_lane *l, uint64_t key) {
    uint32_t id = (uint32_t)key;
    if (id >= MAX_SLOTS || l->gen[id] != (uint32_t)(key >> 32))
        return NULL;
    return l->slot[id];
}

/* A slot's deadline (or engine deadline) is now ``t``; 0 is none. */
static void due_by(vuc_lane *l, double t) {
    if (t != 0 && t < l->next_due)
        l->next_due = t;
}

static void notice(vuc_lane *l) {
    uint64_t one = 1;
    if (l && l->notice_fd >= 0 && write(l->notice_fd, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is already non-zero, Python will look anyway. */
    }
}

void vuc_push_event(vuc_lane *l, vuc_slot *s, const vuc_event *ev) {
    if (s->ev_tail - s->ev_head >= VUC_EVENTS) {
        s->ev_dropped++;
        return;
    }
    int was_empty = s->ev_tail == s->ev_head;
    s->ev[s->ev_tail % VUC_EVENTS] = *ev;
    s->ev_tail++;
    if (was_empty)
        notice(l);
}

/* -- guest memory that disappears ---------------------------------------------------------
 *
 * Guest RAM is a file the front-end shares with us; if it shrinks the file under the
 * mapping, an access raises SIGBUS.  guard.c's handler puts a zero page over the faulting
 * page and counts the fault on the region, so the drain goes on reading zeros; process()
 * then sees the count, marks the ring broken and tells Python to close the session. */

static void guest_memory_fault(vuc_lane *l, vuc_slot *s) {
    s->cursor |= (uint64_t)1 << 48;           /* broken: not touched again until set up anew */
    s->again = 0;
    s->deadline = 0;
    s->memory_faults++;
    vuc_event ev = {.kind = EV_MEMORY_FAULT};
    vuc_push_event(l, s, &ev);
}

/* Did a page of this slot's guest memory fault (and get patched over) since ``epoch``?  Then
 * what the drain read may be zeros: the ring is marked broken and Python told.  The rings
 * lie inside the regions (the session translates their addresses through them). */
static int faulted_since(vuc_lane *l, vuc_slot *s, uint64_t epoch) {
    if (vuc_guard_epoch() == epoch)
        return 0;
    const vuc_queue *q = s->q;
    for (uint32_t i = 0; i < q->nregions; i++)
        if (vuc_guard_faults_in(q->regions[i].host, q->regions[i].size)) {
            guest_memory_fault(l, s);
            return 1;
        }
    return 0;
}

static void process(vuc_lane *l, vuc_slot *s) {
    s->again = 0;
    if ((s->cursor >> 48) & 1)
        return; /* broken: nothing until the ring is set up again */
    uint64_t epoch = vuc_guard_epoch();
    double now = vuc_now_s();
    vuc_disable_notifications(s);
    uint32_t before = vuc_last_avail(s);
    vuc_result res;
    s->drains++;
    s->cursor = vuc_drain(s->q, s->cursor, s->budget, s->num_vcpus, s->perf_request,
                          (vuc_entry *)(void *)s->entries, s->records, s->rejects, s->scratch, &res);
    if (faulted_since(l, s, epoch))
        return;
    if (res.entries) {
        if (vuc_account(l, s, &res, now, l->woke_ns))
            due_by(l, s->engine_due);
        if (res.returned)
            vuc_signal_used(l, s);
    }
    if (res.more) {
        s->again = l->any_again = 1; /* budget spent: other rings get their turn first */
        return;
    }
    int busy = 0;
    if (s->event_idx && s->batch_delay > 0) {
        vuc_batcher_drained(s, now, (vuc_last_avail(s) - before) & 0xFFFF);
        busy = s->busy;
    }
    int pending;
    if (busy) {
        /* Drained on the poll grid every busy ring shares; kicked only by a burst of max_ahead. */
        pending = vuc_set_avail_event(s, vuc_last_avail(s) + s->max_ahead - 1);
        if (s->deadline == 0)
            s->deadline = vuc_next_grid_point(now, s->batch_delay);
        due_by(l, s->deadline);
    } else {
        s->deadline = 0;
        pending = vuc_enable_notifications(s);
    }
    if (faulted_since(l, s, epoch))
        return;
    if (pending)
        s->again = l->any_again = 1;
}

static void observe(vuc_slot *s, double seconds) {
    uint32_t i = 0;
    while (i < VUC_BUCKETS - 1 && s->bounds[i] < seconds)
        i++;
    s->k2d[i]++;
    s->k2d_sum += seconds;
}

/* Run the engine's due deadlines (deferred values, stale hints) and note the next one.
 * Python's own engine calls only ever remove deadlines (release, reconfigure) or run
 * them (a tick): a cached deadline is never later than the engine's, at worst earlier,
 * which costs one empty tick. */
static void tick_engine(vuc_lane *l, vuc_slot *s, double now) {
    double due;
    vuc_engine *e = s->engine;
    pthread_mutex_lock(&e->mu);
    if (vuc_engine_deadline_locked(e, &due) && due <= now) {
        vuc_change out[e->n ? e->n : 1];
        uint32_t k = vuc_engine_tick_locked(e, now, out);
        for (uint32_t i = 0; i < k; i++)
            vuc_actuate(l, s, &out[i]);
    }
    s->engine_due = vuc_engine_deadline_locked(e, &due) ? due : 0;
    pthread_mutex_unlock(&e->mu);
}

/* epoll_wait's timeout until ``t`` (-1: none). */
static int wait_ms(double t) {
    if (t == INFINITY)
        return -1;
    double ms = ceil((t - vuc_now_s()) * 1e3);
    return ms < 0 ? 0 : ms > 60000 ? 60000 : (int)ms;
}

/* Milliseconds until the nearest deadline of any slot (-1: none), running what is due. */
static int housekeeping(vuc_lane *l) {
    double now = vuc_now_s(), next = INFINITY;
    int again = 0;
    for (uint32_t i = 0; i < l->nslots; i++) {
        vuc_slot *s = l->slot[i];
        if (!s)
            continue;
        if (s->deadline != 0 && s->deadline <= now) {
            s->deadline = 0;
            s->polls++;
            process(l, s);
        }
        if (s->again) {
            process(l, s);
            again |= s->again;
        }
        if (s->deadline != 0 && s->deadline < next)
            next = s->deadline;
        if (s->engine && s->engine_due != 0 && s->engine_due <= now)
            tick_engine(l, s, now);
        if (s->engine_due != 0 && s->engine_due < next)
            next = s->engine_due;
    }
    l->next_due = next;
    l->any_again = again;
    if (again)
        return 0;
    return wait_ms(next);
}

/* A kick costs the lane a few microseconds.  Under EEVDF (Linux 6.12+) a fair thread may
 * ask for a slice that long through sched_attr.sched_runtime, and a thread whose slice is
 * shorter than the running thread's preempts it on wake-up.  Without it a kick that wakes
 * the lane on a CPU where a vCPU thread is busy waits until that thread's slice (about
 * 1-3 ms) runs out.  Older kernels ignore the field for fair threads and read back 0. */
static void request_slice(vuc_lane *l) {
    l->tid = (int32_t)syscall(SYS_gettid);
    if (l->slice_req)
        l->slice_err = vuc_request_slice(l->slice_req, &l->slice_ns);
}

static void *lane_main(void *arg) {
    vuc_lane *l = arg;
    struct epoll_event evs[64];
    int timeout = -1;
    pthread_mutex_lock(&l->mu);
    request_slice(l);
    l->ready = 1;
    pthread_cond_broadcast(&l->started);
    pthread_mutex_unlock(&l->mu);
    for (;;) {
        int n = epoll_wait(l->epfd, evs, 64, timeout);
        uint64_t woke = vuc_now_ns(); /* before the lock: waiting for it is the lane's time, not the scheduler's */
        pthread_mutex_lock(&l->mu);
        l->woke_ns = woke;
        if (l->stop) {
            pthread_mutex_unlock(&l->mu);
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            uint64_t v;
            if (evs[i].data.u64 == WAKE_KEY) {
                if (read(l->wakefd, &v, sizeof v) < 0) {
                    /* EAGAIN: another wake-up already consumed it */
                }
                continue;
            }
            vuc_slot *s = slot_of(l, evs[i].data.u64);
            if (!s)
                continue; /* detached meanwhile */
            s->kicks++;
            if (s->again)
                continue; /* its next turn is queued (housekeeping, below): a kick must not buy a second */
            double t0 = vuc_now_s();
            process(l, s);
            observe(s, vuc_now_s() - t0);
        }
        timeout = l->any_again || vuc_now_s() >= l->next_due ? housekeeping(l) : wait_ms(l->next_due);
        pthread_mutex_unlock(&l->mu);
    }
}

static void wake(vuc_lane *l) {
    uint64_t one = 1;
    if (write(l->wakefd, &one, sizeof one) < 0) {
        /* EAGAIN: a wake-up is pending already */
    }
}

/* A lane with its thread running; NULL with errno set on failure.  ``notice_fd``
 * (an eventfd, or -1) is written when a slot's event queue becomes non-empty. */
vuc_lane *vuc_lane_new(int notice_fd, uint64_t slice_ns) {
    vuc_lane *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->started, NULL);
    l->notice_fd = notice_fd;
    l->slice_req = slice_ns;
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    l->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_KEY};
    if (l->epfd < 0 || l->wakefd < 0 || epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wakefd, &ev) < 0)
        goto fail;
    /* Signals stay with Python's main thread: the lane blocks them all but SIGBUS, which a
     * vanished guest RAM raises in the thread that touched it, and the timer signal that
     * interrupts a stalled eventfd write (both guard.c's). */
    int timer_sig = vuc_guard_install();
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    if (timer_sig)
        sigdelset(&all, timer_sig);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&l->thread, NULL, lane_main, l);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        errno = rc;
        goto fail;
    }
    pthread_mutex_lock(&l->mu);
    while (!l->ready)
        pthread_cond_wait(&l->started, &l->mu);
    pthread_mutex_unlock(&l->mu);
    return l;
fail: {
    int err = errno;
    if (l->epfd >= 0)
        close(l->epfd);
    if (l->wakefd >= 0)
        close(l->wakefd);
    pthread_cond_destroy(&l->started);
    pthread_mutex_destroy(&l->mu);
    free(l);
    errno = err;
    return NULL;
}
}

void vuc_lane_free(vuc_lane *l) {
    pthread_mutex_lock(&l->mu);
    l->stop = 1;
    pthread_mutex_unlock(&l->mu);
    wake(l);
    pthread_join(l->thread, NULL);
    close(l->epfd);
    close(l->wakefd);
    pthread_cond_destroy(&l->started);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

/* The lane thread's id and what became of its slice request (see request_slice). */
void vuc_lane_sched(const vuc_lane *l, int32_t *tid, uint64_t *slice_ns, int32_t *err) {
    *tid = l->tid;
    *slice_ns = l->slice_ns;
    *err = l->slice_err;
}

/* Serve ``s``: its kick fd joins the epoll set and the ring is drained once (buffers
 * made available before the ring started are not signalled again).  -1 with errno. */
int vuc_lane_attach(vuc_lane *l, vuc_slot *s) {
    pthread_mutex_lock(&l->mu);
    int32_t id = -1;
    for (uint32_t i = 0; i < MAX_SLOTS; i++)
        if (!l->slot[i]) {
            id = (int32_t)i;
            break;
        }
    if (id < 0) {
        pthread_mutex_unlock(&l->mu);
        errno = ENOSPC;
        return -1;
    }
    l->gen[id]++;
    /* Edge-triggered: every write to an eventfd is a new edge, so the kick is never read and
     * the wake-up costs no system call.  The counter only grows (by one per kick: it would
     * take centuries to fill); Python reads it down when it takes the ring back. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = key_of(l, id)};
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, s->kick_fd, &ev) < 0) {
        int err = errno;
        pthread_mutex_unlock(&l->mu);
        errno = err;
        return -1;
    }
    s->id = id;
    s->again = 1;
    s->deadline = 0;
    s->win_start = 0; /* kicked until the lane's own window finds the ring busy */
    s->win_buffers = s->busy = 0;
    s->engine_due = vuc_now_s(); /* a first look at the engine Python handed over */
    l->any_again = 1;
    l->slot[id] = s;
    if ((uint32_t)id >= l->nslots)
        l->nslots = (uint32_t)id + 1;
    pthread_mutex_unlock(&l->mu);
    wake(l);
    return 0;
}

/* Stop serving ``s``; when this returns the lane no longer touches it. */
void vuc_lane_detach(vuc_lane *l, vuc_slot *s) {
    pthread_mutex_lock(&l->mu);
    if (s->id >= 0 && s->id < MAX_SLOTS && l->slot[s->id] == s) {
        epoll_ctl(l->epfd, EPOLL_CTL_DEL, s->kick_fd, NULL);
        l->slot[s->id] = NULL;
        l->gen[s->id]++;
    }
    s->id = -1;
    pthread_mutex_unlock(&l->mu);
}

/* A new call fd (or -1), taken while the lane is out of every slot. */
void vuc_lane_set_call(vuc_lane *l, vuc_slot *s, int fd) {
    pthread_mutex_lock(&l->mu);
    s->call_fd = fd;
    pthread_mutex_unlock(&l->mu);
}

/* Up to ``max`` queued events of ``s`` into ``out``; returns how many. */
uint32_t vuc_lane_events(vuc_lane *l, vuc_slot *s, vuc_event *out, uint32_t max) {
    uint32_t n = 0;
    pthread_mutex_lock(&l->mu);
    while (n < max && s->ev_head != s->ev_tail) {
        out[n++] = s->ev[s->ev_head % VUC_EVENTS];
        s->ev_head++;
    }
    pthread_mutex_unlock(&l->mu);
    return n;
}

/* Copies of what Python reads in one go, consistent with each other. */
void vuc_lane_snapshot(vuc_lane *l, const vuc_slot *s, vuc_slot *out) {
    pthread_mutex_lock(&l->mu);
    memcpy(out, s, sizeof *s);
    pthread_mutex_unlock(&l->mu);
}

int vuc_lane_abi(void) {
    return (int)(sizeof(vuc_slot) << 16 | sizeof(vuc_event) << 8 | sizeof(vuc_change));
}
