/* The request-queue drain in C: the hot path of the cpufreq device.
 *
 * This is a second implementation of vhost_user_cpufreq.protocol.requests.drain
 * (pure Python, the reference).  It must give the same answer for every ring
 * a guest can write, and tests/test_ring_drain.py checks that on generated
 * rings, garbage included.  Python owns everything else: sequence numbers,
 * counters, logging, the policy, publishing used.idx and notifications.
 *
 * One call pops available chains until the ring is empty or the work budget
 * is spent.  Each chain is walked (direct and indirect descriptors, with the
 * reference's checks in the reference's order), its readable bytes are
 * gathered into a private buffer (the guest cannot change them under us after
 * that), decoded as one request batch, and returned to the used ring with
 * length 0.  The result is a list of entries (one per buffer, or one for an
 * error that concerns the whole ring), the valid records in order, and the
 * records rejected inside otherwise valid batches.
 *
 * Memory: the rings and every buffer live in guest memory that the guest
 * writes concurrently.  Each guest value is loaded exactly once into a local
 * before it is checked and used.  Ring indices are 16-bit loads with acquire
 * order (the spec's read barrier after avail.idx); used elements are plain
 * stores, and Python stores used.idx afterwards (x86 keeps store order; the
 * release fence below covers weaker machines).
 */
#include <string.h>

#include "vuc.h"

static const char *const reason_names[REASON_COUNT] = {
    "ok", "avail-index-jump", "bad-head", "address-out-of-range", "descriptor-loop",
    "indirect-not-negotiated", "indirect-with-next", "bad-indirect-length", "chain-too-long",
    "readable-after-writable", "next-out-of-range", "nested-indirect", "short-batch",
    "bad-batch-flags", "bad-record-count", "bad-batch-size", "bad-vcpu", "bad-util",
    "perf-not-negotiated",
};

const char *vuc_reason_name(int code) {
    return (code >= 0 && code < REASON_COUNT) ? reason_names[code] : NULL;
}

int vuc_abi_sizes(void) {
    /* Lets Python check the layout it assumes before trusting any result. */
    return (int)(sizeof(vuc_entry) << 16 | sizeof(vuc_queue) << 8 | sizeof(vuc_region));
}

static inline uint16_t load16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Guest-physical [gpa, gpa+len), len > 0, entirely inside one region, or NULL. */
static uint8_t *translate(const vuc_queue *q, uint64_t gpa, uint64_t len) {
    for (uint32_t i = 0; i < q->nregions; i++) {
        const vuc_region *r = &q->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t off = gpa - r->gpa;
            return len <= r->size - off ? r->host + off : NULL;
        }
    }
    return NULL;
}

typedef struct {
    uint8_t *buf;       /* the first MAX_BATCH_BYTES readable bytes */
    uint32_t gathered;  /* bytes in buf */
    uint64_t rlen, wlen;
    uint32_t seen_writable;
    uint32_t count;
} walk;

static void gather(walk *w, const uint8_t *src, uint32_t len) {
    if (w->gathered < MAX_BATCH_BYTES) {
        uint32_t n = MAX_BATCH_BYTES - w->gathered;
        if (n > len)
            n = len;
        memcpy(w->buf + w->gathered, src, n);
        w->gathered += n;
    }
}

/* One direct or indirect descriptor's data part; returns a reason or REASON_OK. */
static int take(const vuc_queue *q, walk *w, uint64_t addr, uint32_t len, uint16_t flags) {
    if (w->rlen + w->wlen + len > q->max_chain_bytes)
        return REASON_CHAIN_TOO_LONG;
    if (flags & VIRTQ_DESC_F_WRITE) {
        w->seen_writable = 1;
        if (len && !translate(q, addr, len))
            return REASON_ADDRESS_OUT_OF_RANGE;
        w->wlen += len;
    } else {
        if (w->seen_writable)
            return REASON_READABLE_AFTER_WRITABLE;
        if (len) {
            const uint8_t *src = translate(q, addr, len);
            if (!src)
                return REASON_ADDRESS_OUT_OF_RANGE;
            gather(w, src, len);
        }
        w->rlen += len;
    }
    return REASON_OK;
}

static int walk_indirect(const vuc_queue *q, walk *w, const uint8_t *table, uint32_t n) {
    uint32_t idx = 0, count = 0;
    for (;;) {
        if (count == n)
            return REASON_DESCRIPTOR_LOOP;
        count++;
        w->count++;
        const uint8_t *d = table + (size_t)DESC_SIZE * idx;
        uint64_t addr = load64(d);
        uint32_t len = load32(d + 8);
        uint16_t flags = load16(d + 12);
        uint16_t next = load16(d + 14);
        if (flags & VIRTQ_DESC_F_INDIRECT)
            return REASON_NESTED_INDIRECT;
        int r = take(q, w, addr, len, flags);
        if (r)
            return r;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            return REASON_OK;
        if (next >= n)
            return REASON_NEXT_OUT_OF_RANGE;
        idx = next;
    }
}

static int walk_chain(const vuc_queue *q, walk *w, uint32_t head) {
    uint32_t idx = head;
    for (;;) {
        if (w->count == q->size)
            return REASON_DESCRIPTOR_LOOP;
        w->count++;
        const uint8_t *d = q->desc + (size_t)DESC_SIZE * idx;
        uint64_t addr = load64(d);
        uint32_t len = load32(d + 8);
        uint16_t flags = load16(d + 12);
        uint16_t next = load16(d + 14);
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (!q->indirect)
                return REASON_INDIRECT_NOT_NEGOTIATED;
            if (flags & VIRTQ_DESC_F_NEXT)
                return REASON_INDIRECT_WITH_NEXT;
            if (len == 0 || len % DESC_SIZE || len > DESC_SIZE * MAX_INDIRECT_DESCS)
                return REASON_BAD_INDIRECT_LENGTH;
            if (len > (uint64_t)DESC_SIZE * q->max_indirect)
                return REASON_CHAIN_TOO_LONG;
            const uint8_t *table = translate(q, addr, len);
            if (!table)
                return REASON_ADDRESS_OUT_OF_RANGE;
            return walk_indirect(q, w, table, len / DESC_SIZE);
        }
        int r = take(q, w, addr, len, flags);
        if (r)
            return r;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            return REASON_OK;
        if (next >= q->size)
            return REASON_NEXT_OUT_OF_RANGE;
        idx = next;
    }
}

static void push_used(vuc_queue *q, uint32_t head) {
    uint8_t *e = q->used + 4 + 8 * (size_t)(q->used_idx & (q->size - 1));
    uint32_t zero = 0;
    memcpy(e, &head, 4);
    memcpy(e + 4, &zero, 4);
    q->used_idx = (q->used_idx + 1) & 0xFFFF;
}

/* Decode the gathered bytes as one batch; fills *e, appends records and rejects. */
static uint32_t decode(const vuc_queue *q, const walk *w, vuc_entry *e, uint32_t entry_index,
                       uint8_t *records, uint32_t *nrec, uint32_t *rejects, uint32_t *nrej) {
    if (w->rlen < BATCH_HEADER_SIZE) {
        e->status = REASON_SHORT_BATCH;
        return 1;
    }
    uint32_t seq = load32(w->buf);
    uint16_t n = load16(w->buf + 4);
    uint16_t flags = load16(w->buf + 6);
    if (flags & ~BATCH_F_RESYNC) {
        e->status = REASON_BAD_BATCH_FLAGS;
        return 1;
    }
    if (n < 1 || n > MAX_RECORDS) {
        e->status = REASON_BAD_RECORD_COUNT;
        return 1;
    }
    if (w->rlen != BATCH_HEADER_SIZE + (uint64_t)n * RECORD_SIZE) {
        e->status = REASON_BAD_BATCH_SIZE;
        return 1;
    }
    e->seq = seq;
    e->flags = flags;
    e->ntotal = n;
    e->ts = load64(w->buf + 8);
    uint16_t valid = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *r = w->buf + BATCH_HEADER_SIZE + RECORD_SIZE * i;
        uint16_t vcpu = load16(r), util = load16(r + 2);
        uint32_t perf = load32(r + 4);
        int why = REASON_OK;
        if (vcpu >= q->num_vcpus)
            why = REASON_BAD_VCPU;
        else if (util > UTIL_SCALE)
            why = REASON_BAD_UTIL;
        else if (perf && !q->perf_request)
            why = REASON_PERF_NOT_NEGOTIATED;
        if (why) {
            rejects[(*nrej)++] = entry_index << 16 | (uint32_t)why;
        } else {
            memcpy(records + RECORD_SIZE * (size_t)(*nrec)++, r, RECORD_SIZE);
            valid++;
        }
    }
    e->nvalid = valid;
    return n;
}

/* Drain within ``budget``.  ``entries`` must hold ``budget`` + 1 items, ``records``
 * and ``rejects`` ``budget`` + MAX_RECORDS (the last buffer may overrun the budget).
 * ``cursor`` packs last_avail | avail_shadow << 16 | used_idx << 32 | broken << 48,
 * and the cursor after the drain is returned the same way.  Every buffer popped is
 * also pushed, so the number in flight does not change. */
uint64_t vuc_drain(vuc_queue *q, uint64_t cursor, uint32_t budget, uint32_t num_vcpus,
                   uint32_t perf_request, vuc_entry *entries, uint8_t *records,
                   uint32_t *rejects, uint8_t *scratch, vuc_result *res) {
    uint32_t spent = 0, ne = 0, nrec = 0, nrej = 0, ndesc = 0, more = 1, returned = 0;
    q->last_avail = cursor & 0xFFFF;
    q->avail_shadow = (cursor >> 16) & 0xFFFF;
    q->used_idx = (cursor >> 32) & 0xFFFF;
    q->broken = (cursor >> 48) & 1;
    q->num_vcpus = num_vcpus;
    q->perf_request = perf_request;
    const uint32_t mask = q->size - 1;
    walk w;
    w.buf = scratch;
    while (spent < budget) {
        vuc_entry *e = &entries[ne];
        int why; /* the reason of an error of the whole ring */
        memset(e, 0, sizeof *e);
        if (q->broken) {
            why = REASON_AVAIL_INDEX_JUMP;
            goto ring_error;
        }
        uint32_t last = q->last_avail;
        if (last == q->avail_shadow) {
            uint16_t avail_idx = __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE);
            uint32_t pending = (uint32_t)(avail_idx - last) & 0xFFFF;
            if (pending == 0) {
                more = 0;
                break;
            }
            if (pending > q->size) {
                q->broken = 1;
                why = REASON_AVAIL_INDEX_JUMP;
                goto ring_error;
            }
            q->avail_shadow = avail_idx;
        }
        uint16_t head = __atomic_load_n(&q->avail[2 + (last & mask)], __ATOMIC_RELAXED);
        q->last_avail = (last + 1) & 0xFFFF;
        if (head >= q->size) {
            /* Consumed, but not a descriptor: nothing to return; stop this turn. */
            why = REASON_BAD_HEAD;
            goto ring_error;
        }
        e->head = head;
        w.gathered = 0;
        w.rlen = w.wlen = 0;
        w.seen_writable = 0;
        w.count = 0;
        int r = walk_chain(q, &w, head);
        if (r) {
            e->status = (uint16_t)r;
            spent += 1;
        } else {
            ndesc += w.count;
            uint32_t cost = decode(q, &w, e, ne, records, &nrec, rejects, &nrej);
            uint32_t by_desc = w.count / DESCRIPTORS_PER_UNIT;
            if (by_desc > cost)
                cost = by_desc;
            spent += cost ? cost : 1;
        }
        push_used(q, head);
        returned++;
        ne++;
        continue;
    ring_error:
        /* An error of the ring as a whole: an entry without a head, and the turn ends. */
        e->head = NO_HEAD;
        e->status = (uint16_t)why;
        ne++;
        more = 0;
        break;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    res->entries = ne;
    res->records = nrec;
    res->rejects = nrej;
    res->descriptors = ndesc;
    res->spent = spent;
    res->more = more;
    res->returned = returned;
    return (uint64_t)q->last_avail | (uint64_t)q->avail_shadow << 16 | (uint64_t)q->used_idx << 32 |
           (uint64_t)q->broken << 48;
}
