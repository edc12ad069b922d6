/* The kick lane: guest kick -> drain -> clamp decision -> sched_setattr, in one C thread.
 *
 * Why: waking the asyncio loop and running the kick handler in Python costs
 * 100-200 us per kick (most of it a cache-cold interpreter), ten times an
 * eventfd round trip.  The lane serves every offloaded request queue of the
 * process from one thread that never touches Python: epoll on the rings' kick
 * eventfds, the drain of ring_drain.c, the device's per-batch bookkeeping
 * (CpufreqDevice._account), the clamp engine (engine.py's ClampEngine, ported
 * below and checked against it by tests/test_kick_lane.py), the actuation with
 * sched_setattr, the used-ring publication, the interrupt, and the session's
 * kick batching (Session._process with KickBatcher).
 *
 * Python stays the control plane.  It builds a vuc_slot per started request
 * queue, attaches it, and detaches it before it changes anything the slot
 * points at (ring, guest memory, fds, buffers).  Every access to a slot by
 * the lane happens under the lane mutex, and attach/detach take it, so after
 * vuc_lane_detach() returns the lane no longer looks at the slot.  epoll
 * events name slots by (table index, generation), never by pointer, so an
 * event for a slot detached meanwhile is dropped.  Counters are cumulative
 * u64s that Python reads (aligned loads, no tearing); rejections and clamp
 * errors are queued as events for Python to log (it wakes on notice_fd).
 *
 * Engine locking: each engine has its own mutex, taken by every public
 * engine call, so Python may tick or release an engine the lane also uses.
 * Order is always lane mutex, then engine mutex.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vuc.h"

/* ---- the clamp engine (backend/policy/engine.py is the reference) ---------------------------- */

#define CAPACITY_SCALE 1024
#define NO_CLAMP (-1)

enum change_reason { C_REQUEST, C_DEFERRED, C_STALE, C_RELEASE };

typedef struct {
    int32_t vcpu;
    int32_t value;
    int32_t reason;
} vuc_change;

typedef struct {
    int32_t vcpu, pcpu_cap, vcpu_cap;
    int64_t max_khz;
    int32_t wanted, applied; /* applied NO_CLAMP: never touched */
    double changed_at, record_at;
    int32_t has_record, pending;
    int32_t tid; /* the vCPU thread the lane clamps (not part of the reference engine) */
    int32_t attr_known, policy, nice; /* its scheduling class, read once (see actuate) */
    uint32_t prio, pad;
} evcpu;

typedef struct vuc_engine {
    pthread_mutex_t mu;
    uint32_t n;
    int32_t floor, ceiling, hysteresis;
    double min_interval, stale_after, headroom;
    evcpu *v;       /* placement order, as the reference iterates */
    int32_t *index; /* vCPU id -> position in v, or -1 */
    int32_t nindex;
    int32_t actuate;
} vuc_engine;

typedef struct {
    int32_t vcpu, pcpu_cap, vcpu_cap, pad;
    int64_t max_khz;
} vuc_placement;

vuc_engine *vuc_engine_new(void) {
    vuc_engine *e = calloc(1, sizeof *e);
    if (e)
        pthread_mutex_init(&e->mu, NULL);
    return e;
}

void vuc_engine_free(vuc_engine *e) {
    if (!e)
        return;
    pthread_mutex_destroy(&e->mu);
    free(e->index);
    free(e->v);
    free(e);
}

/* A fresh engine state for these placements, limits and settings (a new ClampEngine),
 * in one step under the engine lock: the lane may be using the engine meanwhile.
 * Thread ids of vCPUs that stay are kept.  0, or -1 when out of memory (unchanged). */
int vuc_engine_configure(vuc_engine *e, uint32_t n, const vuc_placement *p, int32_t floor, int32_t ceiling,
                         int32_t hysteresis, double min_interval, double stale_after, double headroom) {
    int32_t top = -1;
    for (uint32_t i = 0; i < n; i++)
        if (p[i].vcpu > top)
            top = p[i].vcpu;
    evcpu *v = calloc(n ? n : 1, sizeof *v);
    int32_t *index = malloc(sizeof(int32_t) * (size_t)(top + 1 > 0 ? top + 1 : 1));
    if (!v || !index) {
        free(v);
        free(index);
        return -1;
    }
    for (int32_t j = 0; j <= top; j++)
        index[j] = -1;
    pthread_mutex_lock(&e->mu);
    for (uint32_t i = 0; i < n; i++) {
        evcpu *s = &v[i];
        s->vcpu = p[i].vcpu;
        s->pcpu_cap = p[i].pcpu_cap;
        s->vcpu_cap = p[i].vcpu_cap;
        s->max_khz = p[i].max_khz;
        s->applied = NO_CLAMP;
        s->changed_at = -INFINITY;
        if (s->vcpu >= 0) {
            index[s->vcpu] = (int32_t)i;
            if (s->vcpu < e->nindex && e->index[s->vcpu] >= 0) {
                const evcpu *old = &e->v[e->index[s->vcpu]];
                s->tid = old->tid;
                s->attr_known = old->attr_known;
                s->policy = old->policy;
                s->nice = old->nice;
                s->prio = old->prio;
            }
        }
    }
    free(e->v);
    free(e->index);
    e->v = v;
    e->index = index;
    e->nindex = top + 1;
    e->n = n;
    e->floor = floor;
    e->ceiling = ceiling;
    e->hysteresis = hysteresis;
    e->min_interval = min_interval;
    e->stale_after = stale_after;
    e->headroom = headroom;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* The thread the lane clamps for ``vcpu`` (0: none). */
void vuc_engine_set_thread(vuc_engine *e, int32_t vcpu, int32_t tid) {
    pthread_mutex_lock(&e->mu);
    if (vcpu >= 0 && vcpu < e->nindex && e->index[vcpu] >= 0) {
        e->v[e->index[vcpu]].tid = tid;
        e->v[e->index[vcpu]].attr_known = 0;
    }
    pthread_mutex_unlock(&e->mu);
}

/* 1: the lane calls sched_setattr; 0: it records only (dry run, or no util clamps here). */
void vuc_engine_set_actuation(vuc_engine *e, int32_t actuate) {
    pthread_mutex_lock(&e->mu);
    e->actuate = actuate;
    pthread_mutex_unlock(&e->mu);
}

static inline int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }
static inline int32_t imax(int32_t a, int32_t b) { return a > b ? a : b; }

static int32_t bound(const vuc_engine *e, int32_t value, int32_t cap) {
    return imax(imin(e->floor, cap), imin(imin(value, e->ceiling), cap));
}

static int32_t util_to_clamp(int32_t util, int32_t vcpu_cap, int32_t pcpu_cap) {
    int64_t work = (int64_t)util * vcpu_cap / CAPACITY_SCALE;
    return work < pcpu_cap ? (int32_t)work : pcpu_cap;
}

static int32_t perf_to_clamp(int64_t perf, int64_t max_khz, int32_t pcpu_cap, double headroom) {
    if (max_khz <= 0)
        return 0;
    double frac = (double)(perf < max_khz ? perf : max_khz) / (double)max_khz;
    int64_t c = (int64_t)(frac * pcpu_cap * headroom); /* same operations, same order as Python */
    return c < pcpu_cap ? (int32_t)c : pcpu_cap;
}

/* engine.py _consider: 1 and *out filled when the clamp moves now. */
static uint32_t consider(vuc_engine *e, evcpu *s, double now, int reason, vuc_change *out) {
    int32_t lo = bound(e, 0, s->pcpu_cap), hi = bound(e, CAPACITY_SCALE, s->pcpu_cap);
    if (s->applied != NO_CLAMP) {
        int32_t delta = abs(s->wanted - s->applied);
        if (delta == 0 || (delta < e->hysteresis && s->wanted != lo && s->wanted != hi)) {
            s->pending = 0;
            return 0;
        }
    }
    if (now - s->changed_at < e->min_interval) {
        s->pending = 1;
        return 0;
    }
    s->applied = s->wanted;
    s->changed_at = now;
    s->pending = 0;
    out->vcpu = s->vcpu;
    out->value = s->wanted;
    out->reason = reason;
    return 1;
}

static uint32_t engine_record(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now,
                              vuc_change *out) {
    if (vcpu < 0 || vcpu >= e->nindex || e->index[vcpu] < 0)
        return 0;
    evcpu *s = &e->v[e->index[vcpu]];
    int32_t raw = perf ? perf_to_clamp(perf, s->max_khz, s->pcpu_cap, e->headroom)
                       : util_to_clamp(util, s->vcpu_cap, s->pcpu_cap);
    s->wanted = bound(e, raw, s->pcpu_cap);
    s->record_at = now;
    s->has_record = 1;
    return consider(e, s, now, C_REQUEST, out);
}

static uint32_t engine_tick(vuc_engine *e, double now, vuc_change *out) {
    uint32_t k = 0;
    for (uint32_t i = 0; i < e->n; i++) {
        evcpu *s = &e->v[i];
        if (s->has_record && now - s->record_at >= e->stale_after) {
            s->has_record = 0;
            s->wanted = bound(e, 0, s->pcpu_cap);
            k += consider(e, s, now, C_STALE, &out[k]);
        } else if (s->pending) {
            k += consider(e, s, now, C_DEFERRED, &out[k]);
        }
    }
    return k;
}

static int engine_deadline(const vuc_engine *e, double *due) {
    int any = 0;
    double best = 0;
    for (uint32_t i = 0; i < e->n; i++) {
        const evcpu *s = &e->v[i];
        if (s->pending) {
            double t = s->changed_at + e->min_interval;
            if (!any || t < best)
                best = t;
            any = 1;
        }
        if (s->has_record) {
            double t = s->record_at + e->stale_after;
            if (!any || t < best)
                best = t;
            any = 1;
        }
    }
    *due = best;
    return any;
}

uint32_t vuc_engine_record(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now,
                           vuc_change *out) {
    pthread_mutex_lock(&e->mu);
    uint32_t k = engine_record(e, vcpu, util, perf, now, out);
    pthread_mutex_unlock(&e->mu);
    return k;
}

/* ``out`` holds n changes. */
uint32_t vuc_engine_tick(vuc_engine *e, double now, vuc_change *out) {
    pthread_mutex_lock(&e->mu);
    uint32_t k = engine_tick(e, now, out);
    pthread_mutex_unlock(&e->mu);
    return k;
}

int vuc_engine_next_deadline(vuc_engine *e, double *due) {
    pthread_mutex_lock(&e->mu);
    int any = engine_deadline(e, due);
    pthread_mutex_unlock(&e->mu);
    return any;
}

uint32_t vuc_engine_release_all(vuc_engine *e, vuc_change *out) {
    uint32_t k = 0;
    pthread_mutex_lock(&e->mu);
    for (uint32_t i = 0; i < e->n; i++) {
        evcpu *s = &e->v[i];
        s->has_record = 0;
        s->pending = 0;
        s->wanted = 0;
        if (s->applied != NO_CLAMP && s->applied != 0) {
            out[k].vcpu = s->vcpu;
            out[k].value = 0;
            out[k].reason = C_RELEASE;
            k++;
        }
        if (s->applied != NO_CLAMP)
            s->applied = 0;
    }
    pthread_mutex_unlock(&e->mu);
    return k;
}

/* Applied clamp of every position into ``out`` (n items, NO_CLAMP where never touched). */
void vuc_engine_applied(vuc_engine *e, int32_t *out) {
    pthread_mutex_lock(&e->mu);
    for (uint32_t i = 0; i < e->n; i++)
        out[i] = e->v[i].applied;
    pthread_mutex_unlock(&e->mu);
}

/* ---- slots: one offloaded request queue ------------------------------------------------ */

#define VUC_EVENTS 64
#define VUC_BUCKETS 14
#define VUC_ERRNOS 64

enum event_kind {
    EV_RING, EV_BUFFER, EV_RECORDS, EV_STALE, EV_CLAMP_FAILED, EV_UCLAMP_REFUSED, EV_MEMORY_FAULT, EV_CALL_STALLED
};

typedef struct {
    uint16_t kind, reason;
    uint32_t head;     /* buffer head; the thread id for clamp events */
    uint32_t seq;
    uint32_t mask;     /* EV_RECORDS: the reasons seen, 1 << reason */
    uint16_t nbad, ntotal;
    int32_t err;       /* errno of clamp events; last accepted seq of EV_STALE */
} vuc_event;

typedef struct {
    uint32_t util, perf_khz;
    double updated; /* CLOCK_MONOTONIC seconds; < 0: never */
    uint64_t mark;  /* the drain (``drains``) that last brought a record */
    uint32_t fresh; /* records of that drain */
    uint32_t pad;
} vuc_vstate;

typedef struct {
    /* Set by Python before attach (or under the lane lock). */
    vuc_queue *q;
    uint8_t *entries, *records, *scratch;
    uint32_t *rejects;
    vuc_engine *engine; /* NULL: records are only tracked */
    uint64_t *stamps;   /* NULL or per vCPU: decided_ns, records decided, woke_ns of that drain */
    vuc_vstate *vs;     /* per vCPU */
    int32_t kick_fd, call_fd;
    uint32_t budget, num_vcpus, perf_request, event_idx, max_ahead;
    double batch_delay;
    double bounds[VUC_BUCKETS - 1];
    /* DeviceQueue's cursor and interrupt state, handed over on attach and back on detach. */
    uint64_t cursor;
    int32_t signalled; /* -1: unknown */
    /* SeqTracker, handed over the same way. */
    int32_t seq_has, off_has;
    uint32_t seq_last;
    int64_t min_off, last_age;
    uint64_t seq_lost, seq_stale;
    /* Cumulative counters, read by Python. */
    uint64_t kicks, accepted, batches, drains, interrupts, interrupts_dropped, polls;
    uint64_t rejected[REASON_COUNT];
    uint64_t clamps_applied, clamps_recorded, clamp_failed, memory_faults;
    uint64_t clamp_errno[VUC_ERRNOS]; /* clamp_failed by errno (the last one: any errno above) */
    uint64_t k2d[VUC_BUCKETS];
    double k2d_sum;
    /* Events for Python to log; ev_dropped counts those the queue had no room for. */
    vuc_event ev[VUC_EVENTS];
    uint32_t ev_head, ev_tail;
    uint64_t ev_dropped;
    /* Lane-private. */
    double win_start, deadline; /* KickBatcher: the rate window's start (0: none yet); the next poll */
    double engine_due; /* the engine's next deadline as of the lane's last call into it; 0: none */
    uint32_t win_buffers, busy;
    int32_t again, uclamp_refused, id;
} vuc_slot;

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

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

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
    if (l->notice_fd >= 0 && write(l->notice_fd, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is already non-zero, Python will look anyway. */
    }
}

static void push_event(vuc_lane *l, vuc_slot *s, const vuc_event *ev) {
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

/* -- the ring's event suppression (DeviceQueue's methods of the same names) -- */

#define VRING_USED_F_NO_NOTIFY 1u
#define VRING_AVAIL_F_NO_INTERRUPT 1u

static inline uint16_t *used16(const vuc_queue *q, size_t word) { return (uint16_t *)(void *)q->used + word; }

static uint16_t avail_idx(const vuc_queue *q) { return __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE); }

static uint32_t last_avail(const vuc_slot *s) { return (uint32_t)(s->cursor & 0xFFFF); }

static int set_avail_event(vuc_slot *s, uint32_t idx) {
    vuc_queue *q = s->q;
    idx &= 0xFFFF;
    uint16_t *ev = used16(q, 2 + 4 * (size_t)q->size); /* after flags, idx and size 8-byte elements */
    __atomic_store_n(ev, (uint16_t)idx, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the store must be visible before we look at avail.idx */
    uint32_t last = last_avail(s);
    return ((uint32_t)(avail_idx(q) - last) & 0xFFFF) > ((idx - last) & 0xFFFF);
}

static int enable_notifications(vuc_slot *s) {
    if (s->event_idx)
        return set_avail_event(s, last_avail(s));
    uint16_t *flags = used16(s->q, 0);
    __atomic_store_n(flags, (uint16_t)(*flags & ~VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_idx(s->q) != last_avail(s);
}

static void disable_notifications(vuc_slot *s) {
    if (!s->event_idx) {
        uint16_t *flags = used16(s->q, 0);
        __atomic_store_n(flags, (uint16_t)(*flags | VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
    }
}

static int need_event(uint32_t event, uint32_t new_idx, uint32_t old) {
    return ((new_idx - event - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF);
}

/* Publish used.idx and interrupt the driver if it wants one (Session.signal_used). */
static void signal_used(vuc_lane *l, vuc_slot *s) {
    vuc_queue *q = s->q;
    uint32_t new_idx = (uint32_t)(s->cursor >> 32) & 0xFFFF;
    __atomic_store_n(used16(q, 1), (uint16_t)new_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* used.idx before we read the driver's wish */
    int32_t old = s->signalled;
    s->signalled = (int32_t)new_idx;
    int want;
    if (s->event_idx) {
        uint16_t used_event = __atomic_load_n(&q->avail[2 + q->size], __ATOMIC_RELAXED);
        want = old < 0 || need_event(used_event, new_idx, (uint32_t)old);
    } else {
        want = old != (int32_t)new_idx && !(__atomic_load_n(&q->avail[0], __ATOMIC_RELAXED) &
                                             VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (!want || s->call_fd < 0)
        return;
    /* The front-end shares this file description: it may be blocking, or full. */
    int rc = vuc_eventfd_signal(s->call_fd);
    if (rc == 1) {
        s->interrupts++;
        return;
    }
    s->interrupts_dropped++;
    if (rc == -EINTR) {
        /* The front-end made its call fd block and kept it full: it loses the session. */
        s->call_fd = -1;
        vuc_event ev = {.kind = EV_CALL_STALLED};
        push_event(l, s, &ev);
    }
}

/* -- actuation ---------------------------------------------------------------------------- */

struct sched_attr_v1 {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};

/* glibc 2.41 and later define these in <sched.h>; older ones do not. */
#ifndef SCHED_FLAG_RESET_ON_FORK
#define SCHED_FLAG_RESET_ON_FORK 0x01
#endif
#ifndef SCHED_FLAG_KEEP_PARAMS
#define SCHED_FLAG_KEEP_PARAMS 0x10
#endif
#ifndef SCHED_FLAG_UTIL_CLAMP_MIN
#define SCHED_FLAG_UTIL_CLAMP_MIN 0x20
#endif

/* Called with the engine lock held. */
static void actuate(vuc_lane *l, vuc_slot *s, const vuc_change *c) {
    vuc_engine *e = s->engine;
    if (c->vcpu < 0 || c->vcpu >= e->nindex || e->index[c->vcpu] < 0)
        return;
    evcpu *v = &e->v[e->index[c->vcpu]];
    int32_t tid = v->tid;
    if (tid <= 0)
        return; /* no thread known for this vCPU (yet): the engine's value is all there is */
    if (!e->actuate || s->uclamp_refused) {
        s->clamps_recorded++;
        return;
    }
    struct sched_attr_v1 a;
    memset(&a, 0, sizeof a);
    /* The kernel takes SCHED_FLAG_RESET_ON_FORK only with an explicit policy (KEEP_POLICY
     * keeps the old flag too): the thread's class is read once and handed back each time. */
    int known = v->attr_known || syscall(SYS_sched_getattr, tid, &a, sizeof a, 0) == 0;
    if (known && !v->attr_known) {
        v->attr_known = 1;
        v->policy = (int32_t)a.sched_policy;
        v->nice = a.sched_nice;
        v->prio = a.sched_priority;
    }
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.sched_policy = (uint32_t)v->policy;
    a.sched_nice = v->nice;
    a.sched_priority = v->prio;
    a.sched_flags = SCHED_FLAG_KEEP_PARAMS | SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_UTIL_CLAMP_MIN;
    a.sched_util_min = (uint32_t)c->value;
    if (!known || syscall(SYS_sched_setattr, tid, &a, 0) != 0) {
        int err = errno;
        vuc_event ev = {.head = (uint32_t)tid, .err = err};
        if (err == EOPNOTSUPP) {
            s->uclamp_refused = 1; /* the kernel has no per-task clamps: record from now on */
            s->clamps_recorded++;
            ev.kind = EV_UCLAMP_REFUSED;
        } else {
            s->clamp_failed++;
            s->clamp_errno[err > 0 && err < VUC_ERRNOS ? err : VUC_ERRNOS - 1]++;
            ev.kind = EV_CLAMP_FAILED;
        }
        push_event(l, s, &ev);
        return;
    }
    s->clamps_applied++;
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
    push_event(l, s, &ev);
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

/* -- one drain and its bookkeeping (CpufreqDevice.handle_queue and _account) -- */

static int seq_accept(vuc_slot *s, uint32_t seq, int resync) {
    if (!s->seq_has || resync) {
        s->seq_has = 1;
        s->seq_last = seq;
        return 1;
    }
    int32_t d = (int32_t)(seq - s->seq_last);
    if (d <= 0) {
        s->seq_stale++;
        return 0;
    }
    s->seq_lost += (uint64_t)(d - 1);
    s->seq_last = seq;
    return 1;
}

/* Batch age (SeqTracker.age): the guest's timestamp is any 64-bit value, so host - guest
 * can fall below INT64_MIN, and an offset minus a far smaller minimum above INT64_MAX.
 * Both saturate (signed overflow is undefined), as SeqTracker does, so the two agree and
 * the values always fit the int64_t the slot hands back to Python. */
static int64_t batch_offset(int64_t host_ns, uint64_t guest_ns) {
    int64_t off;
    if (__builtin_sub_overflow(host_ns, guest_ns, &off))
        return INT64_MIN; /* host_ns >= 0 and guest_ns >= 0: only ever too small */
    return off;
}

static int64_t batch_age(int64_t off, int64_t min_off) {
    int64_t age;
    if (__builtin_sub_overflow(off, min_off, &age))
        return INT64_MAX; /* min_off <= off: only ever too large */
    return age;
}

static void account(vuc_lane *l, vuc_slot *s, const vuc_result *res, double now) {
    const vuc_entry *entries = (const vuc_entry *)(void *)s->entries;
    const uint8_t *records = s->records;
    int64_t host_ns = (int64_t)now_ns();
    uint32_t pos = 0, r = 0, accepted = 0;
    uint32_t first = UINT32_MAX, last = 0; /* vCPU range with new records */
    for (uint32_t i = 0; i < res->entries; i++) {
        const vuc_entry *e = &entries[i];
        if (e->status) {
            s->rejected[e->status]++;
            vuc_event ev = {.kind = e->head == NO_HEAD ? EV_RING : EV_BUFFER, .reason = e->status, .head = e->head};
            push_event(l, s, &ev);
            continue;
        }
        const uint8_t *mine = records + (size_t)RECORD_SIZE * pos;
        pos += e->nvalid;
        uint32_t mask = 0, nbad = 0;
        for (; r < res->rejects && (s->rejects[r] >> 16) == i; r++) {
            uint32_t code = s->rejects[r] & 0xFFFF;
            s->rejected[code]++;
            mask |= 1u << code;
            nbad++;
        }
        if (nbad) {
            vuc_event ev = {.kind = EV_RECORDS, .head = e->head, .seq = e->seq, .mask = mask,
                            .nbad = (uint16_t)nbad, .ntotal = e->ntotal};
            push_event(l, s, &ev);
        }
        int32_t before = (int32_t)s->seq_last;
        if (!seq_accept(s, e->seq, e->flags & BATCH_F_RESYNC)) {
            vuc_event ev = {.kind = EV_STALE, .head = e->head, .seq = e->seq, .err = before};
            push_event(l, s, &ev);
            continue;
        }
        int64_t off = batch_offset(host_ns, e->ts);
        if (!s->off_has || off < s->min_off) {
            s->min_off = off;
            s->off_has = 1;
        }
        s->last_age = batch_age(off, s->min_off);
        s->batches++;
        for (uint32_t k = 0; k < e->nvalid; k++) {
            const uint8_t *rec = mine + RECORD_SIZE * k;
            uint16_t v, u;
            uint32_t p;
            memcpy(&v, rec, 2);
            memcpy(&u, rec + 2, 2);
            memcpy(&p, rec + 4, 4);
            vuc_vstate *st = &s->vs[v]; /* v < num_vcpus: the drain checked */
            if (st->mark != s->drains) {
                st->mark = s->drains;
                st->fresh = 0;
            }
            st->util = u;
            st->perf_khz = p;
            st->updated = now;
            st->fresh++;
            if (v < first)
                first = v;
            if (v > last)
                last = v;
        }
        accepted += e->nvalid;
    }
    if (!accepted)
        return;
    s->accepted += accepted;
    /* The decision: the engine sees each vCPU's newest record of the drain (newest wins). */
    if (s->engine) {
        vuc_change c;
        pthread_mutex_lock(&s->engine->mu);
        for (uint32_t v = first; v <= last; v++) {
            if (s->vs[v].mark != s->drains)
                continue;
            if (engine_record(s->engine, (int32_t)v, (int32_t)s->vs[v].util, s->vs[v].perf_khz, now, &c))
                actuate(l, s, &c);
        }
        double due;
        s->engine_due = engine_deadline(s->engine, &due) ? due : 0;
        pthread_mutex_unlock(&s->engine->mu);
        due_by(l, s->engine_due);
    }
    if (s->stamps) {
        uint64_t t = now_ns();
        for (uint32_t v = first; v <= last; v++) {
            if (s->vs[v].mark != s->drains)
                continue;
            uint64_t *st = &s->stamps[3 * v];
            __atomic_store_n(&st[0], t, __ATOMIC_RELAXED);
            __atomic_store_n(&st[2], l->woke_ns, __ATOMIC_RELAXED);
            /* The count last, with release: a reader that sees it sees both stamps. */
            __atomic_store_n(&st[1], st[1] + s->vs[v].fresh, __ATOMIC_RELEASE);
        }
    }
}

/* KickBatcher (backend/policy/ratelimit.py): a ring is busy while its buffers arrive at
 * BUSY_ENTER_RATE or more per second over BUSY_WINDOW seconds, until the rate falls
 * below BUSY_LEAVE_RATE; a busy ring is drained on a grid of batch_delay seconds
 * and asks for a kick only after max_ahead buffers. */
#define BUSY_ENTER_RATE 50.0
#define BUSY_LEAVE_RATE 20.0
#define BUSY_WINDOW 0.1

static void batcher(vuc_slot *s, double now, uint32_t buffers) {
    if (s->win_start == 0)
        s->win_start = now;
    s->win_buffers += buffers;
    double elapsed = now - s->win_start;
    if (elapsed >= BUSY_WINDOW) {
        double rate = s->win_buffers / elapsed;
        if (rate >= BUSY_ENTER_RATE)
            s->busy = 1;
        else if (rate < BUSY_LEAVE_RATE)
            s->busy = 0;
        s->win_start = now;
        s->win_buffers = 0;
    }
}

/* The next point of the poll grid every busy ring shares (KickBatcher.next_poll). */
static double next_grid_point(double now, double period) { return (floor(now / period) + 1) * period; }

/* The busy rule alone, for tests against KickBatcher: one drain of ``buffers`` at ``now`` on
 * a slot no lane serves.  Returns 1 if that leaves the ring busy, with the grid point of its
 * next poll in *next_poll (0 when kicked). */
int vuc_busy_rule(vuc_slot *s, double now, uint32_t buffers, double *next_poll) {
    batcher(s, now, buffers);
    *next_poll = s->busy ? next_grid_point(now, s->batch_delay) : 0;
    return (int)s->busy;
}

static void process(vuc_lane *l, vuc_slot *s) {
    s->again = 0;
    if ((s->cursor >> 48) & 1)
        return; /* broken: nothing until the ring is set up again */
    uint64_t epoch = vuc_guard_epoch();
    double now = now_s();
    disable_notifications(s);
    uint32_t before = last_avail(s);
    vuc_result res;
    s->drains++;
    s->cursor = vuc_drain(s->q, s->cursor, s->budget, s->num_vcpus, s->perf_request,
                          (vuc_entry *)(void *)s->entries, s->records, s->rejects, s->scratch, &res);
    if (faulted_since(l, s, epoch))
        return;
    if (res.entries) {
        account(l, s, &res, now);
        if (res.returned)
            signal_used(l, s);
    }
    if (res.more) {
        s->again = l->any_again = 1; /* budget spent: other rings get their turn first */
        return;
    }
    int busy = 0;
    if (s->event_idx && s->batch_delay > 0) {
        batcher(s, now, (last_avail(s) - before) & 0xFFFF);
        busy = s->busy;
    }
    int pending;
    if (busy) {
        /* Drained on the poll grid every busy ring shares; kicked only by a burst of max_ahead. */
        pending = set_avail_event(s, last_avail(s) + s->max_ahead - 1);
        if (s->deadline == 0)
            s->deadline = next_grid_point(now, s->batch_delay);
        due_by(l, s->deadline);
    } else {
        s->deadline = 0;
        pending = enable_notifications(s);
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
    if (engine_deadline(e, &due) && due <= now) {
        vuc_change out[e->n ? e->n : 1];
        uint32_t k = engine_tick(e, now, out);
        for (uint32_t i = 0; i < k; i++)
            actuate(l, s, &out[i]);
    }
    s->engine_due = engine_deadline(e, &due) ? due : 0;
    pthread_mutex_unlock(&e->mu);
}

/* epoll_wait's timeout until ``t`` (-1: none). */
static int wait_ms(double t) {
    if (t == INFINITY)
        return -1;
    double ms = ceil((t - now_s()) * 1e3);
    return ms < 0 ? 0 : ms > 60000 ? 60000 : (int)ms;
}

/* Milliseconds until the nearest deadline of any slot (-1: none), running what is due. */
static int housekeeping(vuc_lane *l) {
    double now = now_s(), next = INFINITY;
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
    if (!l->slice_req)
        return;
    struct sched_attr_v1 a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) != 0) {
        l->slice_err = errno;
        return;
    }
    if (a.sched_policy != SCHED_OTHER && a.sched_policy != SCHED_BATCH) {
        l->slice_err = EINVAL; /* started real-time or idle: not ours to change */
        return;
    }
    a.size = sizeof a;
    a.sched_flags &= SCHED_FLAG_RESET_ON_FORK; /* policy and nice as they are, clamps untouched */
    a.sched_runtime = l->slice_req;
    a.sched_deadline = a.sched_period = 0;
    if (syscall(SYS_sched_setattr, 0, &a, 0) != 0) {
        l->slice_err = errno;
        return;
    }
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) == 0)
        l->slice_ns = a.sched_runtime;
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
        uint64_t woke = now_ns(); /* before the lock: waiting for it is the lane's time, not the scheduler's */
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
            double t0 = now_s();
            process(l, s);
            observe(s, now_s() - t0);
        }
        timeout = l->any_again || now_s() >= l->next_due ? housekeeping(l) : wait_ms(l->next_due);
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
    s->engine_due = now_s(); /* a first look at the engine Python handed over */
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
