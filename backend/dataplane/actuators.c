/* sched_setattr from the kick lane: a decided clamp onto its vCPU thread, as ThreadActuator
 * (backend/host/actuators.py) applies one from the event loop (policy and nice kept,
 * SCHED_FLAG_RESET_ON_FORK set, util_min the engine's value), and the lane thread's own slice.
 * tests/test_twins.py lists the tests that check both on this kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "slot.h"

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

/* A failed clamp counted by errno and queued for Python to log; a kernel without per-task
 * clamps (EOPNOTSUPP) turns the slot to recording from then on. */
static void clamp_failed(vuc_lane *l, vuc_slot *s, int32_t tid, int err) {
    vuc_event ev = {.head = (uint32_t)tid, .err = err};
    if (err == EOPNOTSUPP) {
        s->uclamp_refused = 1;
        s->clamps_recorded++;
        ev.kind = EV_UCLAMP_REFUSED;
    } else {
        s->clamp_failed++;
        s->clamp_errno[err > 0 && err < VUC_ERRNOS ? err : VUC_ERRNOS - 1]++;
        ev.kind = EV_CLAMP_FAILED;
    }
    vuc_push_event(l, s, &ev);
}

/* Called with the engine lock held. */
void vuc_actuate(vuc_lane *l, vuc_slot *s, const vuc_change *c) {
    evcpu *v = vuc_engine_find(s->engine, c->vcpu);
    if (!v)
        return;
    int32_t tid = v->tid;
    if (tid <= 0)
        return; /* no thread known for this vCPU (yet): the engine's value is all there is */
    if (!s->engine->actuate || s->uclamp_refused) {
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
        clamp_failed(l, s, tid, errno);
        return;
    }
    s->clamps_applied++;
}

/* The actuation alone, for tests against ThreadActuator: vCPU ``vcpu``'s thread clamped to ``value``
 * as the lane would, on a slot no lane serves (its counters and events tell what happened). */
void vuc_actuate_rule(vuc_slot *s, int32_t vcpu, int32_t value) {
    vuc_change c = {.vcpu = vcpu, .value = value, .reason = C_REQUEST};
    pthread_mutex_lock(&s->engine->mu);
    vuc_actuate(NULL, s, &c);
    pthread_mutex_unlock(&s->engine->mu);
}

/* A kick costs the lane a few microseconds.  Under EEVDF (Linux 6.12+) a fair thread may
 * ask for a slice that long through sched_attr.sched_runtime, and a thread whose slice is
 * shorter than the running thread's preempts it on wake-up.  Without it a kick that wakes
 * the lane on a CPU where a vCPU thread is busy waits until that thread's slice (about
 * 1-3 ms) runs out.  Older kernels ignore the field for fair threads and read back 0.
 * For the calling thread: 0 and the slice read back in *slice_ns, or an errno. */
int vuc_request_slice(uint64_t slice_req, uint64_t *slice_ns) {
    struct sched_attr_v1 a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) != 0)
        return errno;
    if (a.sched_policy != SCHED_OTHER && a.sched_policy != SCHED_BATCH)
        return EINVAL; /* started real-time or idle: not ours to change */
    a.size = sizeof a;
    a.sched_flags &= SCHED_FLAG_RESET_ON_FORK; /* policy and nice as they are, clamps untouched */
    a.sched_runtime = slice_req;
    a.sched_deadline = a.sched_period = 0;
    if (syscall(SYS_sched_setattr, 0, &a, 0) != 0)
        return errno;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) == 0)
        *slice_ns = a.sched_runtime;
    return 0;
}
