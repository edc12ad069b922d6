/* The ring's event suppression and the interrupt as the kick lane does them: the twin of
 * protocol/virtqueue.py's DeviceQueue (enable_notifications, disable_notifications,
 * set_avail_event, need_event) and of the session's signal_used, on the slot's copy of the
 * queue's cursor and interrupt state.  tests/test_twins.py serves the same VMs on the lane and
 * on the event loop and compares what the driver saw.
 */
#define _GNU_SOURCE
#include <errno.h>

#include "slot.h"

#define VRING_USED_F_NO_NOTIFY 1u
#define VRING_AVAIL_F_NO_INTERRUPT 1u

static inline uint16_t *used16(const vuc_queue *q, size_t word) { return (uint16_t *)(void *)q->used + word; }

static uint16_t avail_idx(const vuc_queue *q) { return __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE); }

uint32_t vuc_last_avail(const vuc_slot *s) { return (uint32_t)(s->cursor & 0xFFFF); }

/* 1 if buffers past ``idx`` are already there (the kick asked for may never come). */
int vuc_set_avail_event(vuc_slot *s, uint32_t idx) {
    vuc_queue *q = s->q;
    idx &= 0xFFFF;
    uint16_t *ev = used16(q, 2 + 4 * (size_t)q->size); /* after flags, idx and size 8-byte elements */
    __atomic_store_n(ev, (uint16_t)idx, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the store must be visible before we look at avail.idx */
    uint32_t last = vuc_last_avail(s);
    return ((uint32_t)(avail_idx(q) - last) & 0xFFFF) > ((idx - last) & 0xFFFF);
}

/* 1 if buffers arrived meanwhile (drain again: their kick may have been suppressed). */
int vuc_enable_notifications(vuc_slot *s) {
    if (s->event_idx)
        return vuc_set_avail_event(s, vuc_last_avail(s));
    uint16_t *flags = used16(s->q, 0);
    __atomic_store_n(flags, (uint16_t)(*flags & ~VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_idx(s->q) != vuc_last_avail(s);
}

void vuc_disable_notifications(vuc_slot *s) {
    if (!s->event_idx) {
        uint16_t *flags = used16(s->q, 0);
        __atomic_store_n(flags, (uint16_t)(*flags | VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
    }
}

static int need_event(uint32_t event, uint32_t new_idx, uint32_t old) {
    return ((new_idx - event - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF);
}

/* Publish used.idx; 1 if the driver wants an interrupt for it (DeviceQueue.publish, should_notify). */
static int publish_used(vuc_slot *s) {
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
    return want;
}

/* Publish used.idx and interrupt the driver if it wants one (Session.signal_used). */
void vuc_signal_used(vuc_lane *l, vuc_slot *s) {
    if (!publish_used(s) || s->call_fd < 0)
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
        vuc_push_event(l, s, &ev);
    }
}

/* The rules alone, for tests against DeviceQueue, on a slot no lane serves: 0 enable_notifications,
 * 1 disable_notifications, 2 set_avail_event(arg), 3 publish used.idx and say whether the driver
 * wants an interrupt (nothing is signalled).  Returns the rule's answer (0 for disable). */
int vuc_ring_rule(vuc_slot *s, int op, uint32_t arg) {
    switch (op) {
    case 0:
        return vuc_enable_notifications(s);
    case 1:
        vuc_disable_notifications(s);
        return 0;
    case 2:
        return vuc_set_avail_event(s, arg);
    case 3:
        return publish_used(s);
    default:
        return -1;
    }
}
