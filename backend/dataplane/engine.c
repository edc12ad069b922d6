/* The clamp engine (backend/policy/engine.py's ClampEngine, ported function for function: the same
 * operations in the same order, so the two agree to the last bit; tests/test_twins.py checks it on
 * generated placements, limits and sequences of records, ticks and releases).  See engine.h.
 */
#include <math.h>
#include <stdlib.h>

#include "engine.h"

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
        s->top = p[i].cap < p[i].pcpu_cap ? p[i].cap : p[i].pcpu_cap;
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

evcpu *vuc_engine_find(vuc_engine *e, int32_t vcpu) {
    if (vcpu < 0 || vcpu >= e->nindex || e->index[vcpu] < 0)
        return NULL;
    return &e->v[e->index[vcpu]];
}

static inline int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }
static inline int32_t imax(int32_t a, int32_t b) { return a > b ? a : b; }

static int32_t bound(const vuc_engine *e, int32_t value, int32_t top) {
    return imax(imin(e->floor, top), imin(imin(value, e->ceiling), top));
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
    int32_t lo = bound(e, 0, s->top), hi = bound(e, CAPACITY_SCALE, s->top);
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

uint32_t vuc_engine_record_locked(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now,
                                  vuc_change *out) {
    evcpu *s = vuc_engine_find(e, vcpu);
    if (!s)
        return 0;
    int32_t raw = perf ? perf_to_clamp(perf, s->max_khz, s->pcpu_cap, e->headroom)
                       : util_to_clamp(util, s->vcpu_cap, s->pcpu_cap);
    s->wanted = bound(e, raw, s->top);
    s->record_at = now;
    s->has_record = 1;
    return consider(e, s, now, C_REQUEST, out);
}

uint32_t vuc_engine_tick_locked(vuc_engine *e, double now, vuc_change *out) {
    uint32_t k = 0;
    for (uint32_t i = 0; i < e->n; i++) {
        evcpu *s = &e->v[i];
        if (s->has_record && now - s->record_at >= e->stale_after) {
            s->has_record = 0;
            s->wanted = bound(e, 0, s->top);
            k += consider(e, s, now, C_STALE, &out[k]);
        } else if (s->pending) {
            k += consider(e, s, now, C_DEFERRED, &out[k]);
        }
    }
    return k;
}

int vuc_engine_deadline_locked(const vuc_engine *e, double *due) {
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
    uint32_t k = vuc_engine_record_locked(e, vcpu, util, perf, now, out);
    pthread_mutex_unlock(&e->mu);
    return k;
}

/* ``out`` holds n changes. */
uint32_t vuc_engine_tick(vuc_engine *e, double now, vuc_change *out) {
    pthread_mutex_lock(&e->mu);
    uint32_t k = vuc_engine_tick_locked(e, now, out);
    pthread_mutex_unlock(&e->mu);
    return k;
}

int vuc_engine_next_deadline(vuc_engine *e, double *due) {
    pthread_mutex_lock(&e->mu);
    int any = vuc_engine_deadline_locked(e, due);
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

/* Every position's decision state into ``out`` (n items, placement order). */
void vuc_engine_get_state(vuc_engine *e, vuc_vcpu_state *out) {
    pthread_mutex_lock(&e->mu);
    for (uint32_t i = 0; i < e->n; i++) {
        const evcpu *s = &e->v[i];
        out[i] = (vuc_vcpu_state){s->vcpu, s->wanted, s->applied, s->has_record, s->pending, 0,
                                  s->changed_at, s->record_at};
    }
    pthread_mutex_unlock(&e->mu);
}

/* A predecessor's state, by vCPU id (engine.py restore_state); -1, and nothing changed, if a vCPU is
 * not one of this engine's. */
int vuc_engine_set_state(vuc_engine *e, uint32_t n, const vuc_vcpu_state *in) {
    pthread_mutex_lock(&e->mu);
    for (uint32_t k = 0; k < n; k++) {
        if (in[k].vcpu < 0 || in[k].vcpu >= e->nindex || e->index[in[k].vcpu] < 0) {
            pthread_mutex_unlock(&e->mu);
            return -1;
        }
    }
    for (uint32_t k = 0; k < n; k++) {
        evcpu *s = &e->v[e->index[in[k].vcpu]];
        s->wanted = in[k].wanted;
        s->applied = in[k].applied;
        s->has_record = in[k].has_record;
        s->pending = in[k].pending;
        s->changed_at = in[k].changed_at;
        s->record_at = in[k].record_at;
    }
    pthread_mutex_unlock(&e->mu);
    return 0;
}
