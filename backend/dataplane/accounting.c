/* The device's bookkeeping of one drain, as the kick lane does it: the twin of
 * backend/cpufreq/device.py (CpufreqDevice._account, with SeqTracker for sequence numbers and
 * batch age, and the hand-off of each vCPU's newest record to the clamp engine).
 * tests/test_twins.py serves the same hostile rings on the lane and with the device on the
 * test's thread and compares the state both leave behind.
 *
 * vuc_account() walks the drain's entries; each job is its own function below: a buffer
 * rejected whole, the records dropped from a valid batch, the sequence and age check, the
 * per-vCPU state, the decision, and the decision's timestamps.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>

#include "slot.h"

/* The vCPUs a drain brought records for (first > last: none). */
typedef struct {
    uint32_t first, last;
} vcpu_range;

/* SeqTracker.accept: 1 if the batch is newer than the last one accepted (or a resync). */
static int seq_accept(vuc_slot *s, uint32_t seq, int resync) {
    if (!s->seq_has || resync) {
        s->seq_has = 1;
        s->seq_last = seq;
        s->seq_undecoded = 0;
        return 1;
    }
    int32_t d = (int32_t)(seq - s->seq_last);
    if (d <= 0) {
        s->seq_stale++;
        return 0;
    }
    /* SPEC 6.2: of the d - 1 numbers skipped, those of buffers rejected whole arrived. */
    if ((uint32_t)(d - 1) > s->seq_undecoded)
        s->seq_lost += (uint64_t)((uint32_t)(d - 1) - s->seq_undecoded);
    s->seq_undecoded = 0;
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

static void seq_age(vuc_slot *s, int64_t host_ns, uint64_t guest_ns) {
    int64_t off = batch_offset(host_ns, guest_ns);
    if (!s->off_has || off < s->min_off) {
        s->min_off = off;
        s->off_has = 1;
    }
    s->last_age = batch_age(off, s->min_off);
}

/* A buffer (or the whole ring: no head) the drain rejected: counted, and queued to be logged. */
static void reject_entry(vuc_lane *l, vuc_slot *s, const vuc_entry *e) {
    s->rejected[e->status]++;
    if (e->status != REASON_AVAIL_INDEX_JUMP && s->seq_undecoded != UINT32_MAX)
        s->seq_undecoded++; /* it consumed an avail entry: a batch whose seq is not trusted */
    vuc_event ev = {.kind = e->head == NO_HEAD ? EV_RING : EV_BUFFER, .reason = e->status, .head = e->head};
    vuc_push_event(l, s, &ev);
}

/* The records the drain dropped from entry ``i``'s otherwise valid batch (rejects[] is in entry
 * order, ``r`` the first not yet counted): each counted, one event per batch.  The next ``r``. */
static uint32_t count_dropped_records(vuc_lane *l, vuc_slot *s, const vuc_entry *e, uint32_t i, uint32_t r,
                                      uint32_t nrejects) {
    uint32_t mask = 0, nbad = 0;
    for (; r < nrejects && (s->rejects[r] >> 16) == i; r++) {
        uint32_t code = s->rejects[r] & 0xFFFF;
        s->rejected[code]++;
        mask |= 1u << code;
        nbad++;
    }
    if (nbad) {
        vuc_event ev = {.kind = EV_RECORDS, .head = e->head, .seq = e->seq, .mask = mask,
                        .nbad = (uint16_t)nbad, .ntotal = e->ntotal};
        vuc_push_event(l, s, &ev);
    }
    return r;
}

/* The batch's sequence number and age (SeqTracker): 1 if accepted, 0 if stale (queued to be logged). */
static int accept_batch(vuc_lane *l, vuc_slot *s, const vuc_entry *e, int64_t host_ns) {
    int32_t before = (int32_t)s->seq_last;
    if (!seq_accept(s, e->seq, e->flags & BATCH_F_RESYNC)) {
        vuc_event ev = {.kind = EV_STALE, .head = e->head, .seq = e->seq, .err = before};
        vuc_push_event(l, s, &ev);
        return 0;
    }
    seq_age(s, host_ns, e->ts);
    s->batches++;
    return 1;
}

/* A batch's records into the per-vCPU state (newest wins), marked with this drain. */
static void store_records(vuc_slot *s, const uint8_t *recs, uint32_t n, double now, vcpu_range *range) {
    for (uint32_t k = 0; k < n; k++) {
        const uint8_t *rec = recs + RECORD_SIZE * k;
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
        if (v < range->first)
            range->first = v;
        if (v > range->last)
            range->last = v;
    }
}

/* The decision: the engine sees each vCPU's newest record of the drain, and its clamps are applied. */
static void decide(vuc_lane *l, vuc_slot *s, vcpu_range range, double now) {
    vuc_engine *e = s->engine;
    vuc_change c;
    pthread_mutex_lock(&e->mu);
    for (uint32_t v = range.first; v <= range.last; v++) {
        if (s->vs[v].mark != s->drains)
            continue;
        if (vuc_engine_record_locked(e, (int32_t)v, (int32_t)s->vs[v].util, s->vs[v].perf_khz, now, &c))
            vuc_actuate(l, s, &c);
    }
    double due;
    s->engine_due = vuc_engine_deadline_locked(e, &due) ? due : 0;
    pthread_mutex_unlock(&e->mu);
}

/* When each vCPU's records were decided on, and when the lane woke for them (the latency rig). */
static void stamp_decisions(vuc_slot *s, vcpu_range range, uint64_t woke_ns) {
    uint64_t t = vuc_now_ns();
    for (uint32_t v = range.first; v <= range.last; v++) {
        if (s->vs[v].mark != s->drains)
            continue;
        uint64_t *st = &s->stamps[3 * v];
        __atomic_store_n(&st[0], t, __ATOMIC_RELAXED);
        __atomic_store_n(&st[2], woke_ns, __ATOMIC_RELAXED);
        /* The count last, with release: a reader that sees it sees both stamps. */
        __atomic_store_n(&st[1], st[1] + s->vs[v].fresh, __ATOMIC_RELEASE);
    }
}

/* CpufreqDevice._account on the lane.  Returns 1 if the engine was consulted (its next deadline,
 * s->engine_due, may have moved). */
int vuc_account(vuc_lane *l, vuc_slot *s, const vuc_result *res, double now, uint64_t woke_ns) {
    const vuc_entry *entries = (const vuc_entry *)(void *)s->entries;
    int64_t host_ns = (int64_t)vuc_now_ns();
    uint32_t pos = 0, r = 0, accepted = 0;
    vcpu_range range = {UINT32_MAX, 0};
    for (uint32_t i = 0; i < res->entries; i++) {
        const vuc_entry *e = &entries[i];
        if (e->status) {
            reject_entry(l, s, e);
            continue;
        }
        const uint8_t *mine = s->records + (size_t)RECORD_SIZE * pos;
        pos += e->nvalid;
        r = count_dropped_records(l, s, e, i, r, res->rejects);
        if (!accept_batch(l, s, e, host_ns))
            continue;
        store_records(s, mine, e->nvalid, now, &range);
        accepted += e->nvalid;
    }
    if (!accepted)
        return 0;
    s->accepted += accepted;
    if (s->engine)
        decide(l, s, range, now);
    if (s->stamps)
        stamp_decisions(s, range, woke_ns);
    return s->engine != NULL;
}
