/* The clamp engine in C (backend/policy/engine.py's ClampEngine is the reference; tests/test_twins.py
 * runs both on the same inputs).  Its own file so it reads beside engine.py, function for function.
 *
 * Locking: each engine has its own mutex, taken by every public vuc_engine_* call, so Python may
 * tick or release an engine the lane also uses.  The lane takes it itself around a run of
 * *_locked calls (a drain's decisions, a tick) and its actuation; the order is always lane mutex,
 * then engine mutex.
 */
#ifndef VUC_ENGINE_H
#define VUC_ENGINE_H

#include <pthread.h>
#include <stdint.h>

#include "vuc.h"

#define CAPACITY_SCALE 1024
#define NO_CLAMP (-1)

enum change_reason { C_REQUEST, C_DEFERRED, C_STALE, C_RELEASE };

typedef struct {
    int32_t vcpu;
    int32_t value;
    int32_t reason;
} vuc_change;

typedef struct {
    int32_t vcpu, pcpu_cap, vcpu_cap, cap; /* cap: engine.py effective_cap(), the vCPU's uclamp_max */
    int64_t max_khz;
} vuc_placement;

/* One vCPU's engine state (engine.py _Vcpu), and what the lane needs to clamp its thread. */
typedef struct {
    int32_t vcpu, pcpu_cap, vcpu_cap;
    int32_t top; /* no clamp above: min(pcpu_cap, cap), engine.py _Vcpu.top */
    int64_t max_khz;
    int32_t wanted, applied; /* applied NO_CLAMP: never touched */
    double changed_at, record_at;
    int32_t has_record, pending;
    int32_t tid; /* the vCPU thread the lane clamps (not part of the reference engine) */
    int32_t attr_known, policy, nice; /* its scheduling class, read once (see actuators.c) */
    uint32_t prio, pad;
} evcpu;

/* One vCPU's decision state as engine.py's ClampEngine.state() gives it: carried to a successor process. */
typedef struct {
    int32_t vcpu, wanted, applied, has_record, pending, pad;
    double changed_at, record_at;
} vuc_vcpu_state;

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

/* The public calls (declared to cffi in cdefs.py), each under the engine lock. */
vuc_engine *vuc_engine_new(void);
void vuc_engine_free(vuc_engine *e);
int vuc_engine_configure(vuc_engine *e, uint32_t n, const vuc_placement *p, int32_t floor, int32_t ceiling,
                         int32_t hysteresis, double min_interval, double stale_after, double headroom);
void vuc_engine_set_thread(vuc_engine *e, int32_t vcpu, int32_t tid);
void vuc_engine_set_actuation(vuc_engine *e, int32_t actuate);
uint32_t vuc_engine_record(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now, vuc_change *out);
uint32_t vuc_engine_tick(vuc_engine *e, double now, vuc_change *out);
int vuc_engine_next_deadline(vuc_engine *e, double *due);
uint32_t vuc_engine_release_all(vuc_engine *e, vuc_change *out);
void vuc_engine_applied(vuc_engine *e, int32_t *out);
void vuc_engine_get_state(vuc_engine *e, vuc_vcpu_state *out);
int vuc_engine_set_state(vuc_engine *e, uint32_t n, const vuc_vcpu_state *in);

/* The same with the engine lock already held (the lane). */
VUC_INTERNAL evcpu *vuc_engine_find(vuc_engine *e, int32_t vcpu);
VUC_INTERNAL uint32_t vuc_engine_record_locked(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now,
                                               vuc_change *out);
VUC_INTERNAL uint32_t vuc_engine_tick_locked(vuc_engine *e, double now, vuc_change *out);
VUC_INTERNAL int vuc_engine_deadline_locked(const vuc_engine *e, double *due);

#endif
