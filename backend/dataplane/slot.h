/* One offloaded request queue as the kick lane serves it (vuc_slot), and the calls between the lane
 * (kick_lane.c) and the twins it runs on a slot: the device's bookkeeping (accounting.c), the kick
 * batcher (kick_batcher.c), the ring's event suppression and interrupt (virtqueue.c) and the clamp
 * actuation (actuators.c).
 *
 * Every access to a slot happens under the lane mutex (see kick_lane.c); Python declares the
 * same layout to cffi (cdefs.py) and checks it with vuc_lane_abi().
 */
#ifndef VUC_SLOT_H
#define VUC_SLOT_H

#include <stdint.h>
#include <time.h>

#include "engine.h"
#include "vuc.h"

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
    uint32_t seq_last, seq_undecoded; /* SeqTracker.undecoded: buffers rejected whole since seq_last */
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

typedef struct vuc_lane vuc_lane;

static inline double vuc_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline uint64_t vuc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* kick_lane.c: queue an event for Python to log (it wakes on the lane's notice fd; l may be NULL
 * for a slot no lane serves, as the *_rule test entries use). */
VUC_INTERNAL void vuc_push_event(vuc_lane *l, vuc_slot *s, const vuc_event *ev);

/* accounting.c: one drain's entries counted, sequence-checked, stored and decided on. */
VUC_INTERNAL int vuc_account(vuc_lane *l, vuc_slot *s, const vuc_result *res, double now, uint64_t woke_ns);

/* kick_batcher.c: the busy rule after a drain of ``buffers``, and the shared poll grid. */
VUC_INTERNAL void vuc_batcher_drained(vuc_slot *s, double now, uint32_t buffers);
VUC_INTERNAL double vuc_next_grid_point(double now, double period);
int vuc_busy_rule(vuc_slot *s, double now, uint32_t buffers, double *next_poll);

/* virtqueue.c: the ring's event suppression and the interrupt. */
VUC_INTERNAL uint32_t vuc_last_avail(const vuc_slot *s);
VUC_INTERNAL int vuc_set_avail_event(vuc_slot *s, uint32_t idx);
VUC_INTERNAL int vuc_enable_notifications(vuc_slot *s);
VUC_INTERNAL void vuc_disable_notifications(vuc_slot *s);
VUC_INTERNAL void vuc_signal_used(vuc_lane *l, vuc_slot *s);
int vuc_ring_rule(vuc_slot *s, int op, uint32_t arg);

/* actuators.c: a decided clamp onto its vCPU thread (engine lock held); the lane's own slice. */
VUC_INTERNAL void vuc_actuate(vuc_lane *l, vuc_slot *s, const vuc_change *c);
VUC_INTERNAL int vuc_request_slice(uint64_t slice_req, uint64_t *slice_ns);
void vuc_actuate_rule(vuc_slot *s, int32_t vcpu, int32_t value);

/* The lane's calls (declared to cffi in cdefs.py). */
vuc_lane *vuc_lane_new(int notice_fd, uint64_t slice_ns);
void vuc_lane_sched(const vuc_lane *l, int32_t *tid, uint64_t *slice_ns, int32_t *err);
void vuc_lane_free(vuc_lane *l);
int vuc_lane_attach(vuc_lane *l, vuc_slot *s);
void vuc_lane_detach(vuc_lane *l, vuc_slot *s);
void vuc_lane_set_call(vuc_lane *l, vuc_slot *s, int fd);
uint32_t vuc_lane_events(vuc_lane *l, vuc_slot *s, vuc_event *out, uint32_t max);
void vuc_lane_snapshot(vuc_lane *l, const vuc_slot *s, vuc_slot *out);
int vuc_lane_abi(void);

#endif
