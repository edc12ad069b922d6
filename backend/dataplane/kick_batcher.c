/* The kick batcher (KickBatcher in backend/policy/ratelimit.py is the reference; tests/test_twins.py
 * runs both on the same drains).
 *
 * A ring is busy while its buffers arrive at BUSY_ENTER_RATE or more per second over BUSY_WINDOW
 * seconds, until the rate falls below BUSY_LEAVE_RATE; a busy ring is drained on a grid of
 * batch_delay seconds and asks for a kick only after max_ahead buffers (kick_lane.c's process()).
 */
#define _GNU_SOURCE
#include <math.h>

#include "slot.h"

#define BUSY_ENTER_RATE 50.0
#define BUSY_LEAVE_RATE 20.0
#define BUSY_WINDOW 0.1

/* KickBatcher.drained: ``buffers`` more in the window; at its end, busy or not by the rate. */
void vuc_batcher_drained(vuc_slot *s, double now, uint32_t buffers) {
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
double vuc_next_grid_point(double now, double period) { return (floor(now / period) + 1) * period; }

/* The busy rule alone, for tests against KickBatcher: one drain of ``buffers`` at ``now`` on
 * a slot no lane serves.  Returns 1 if that leaves the ring busy, with the grid point of its
 * next poll in *next_poll (0 when kicked). */
int vuc_busy_rule(vuc_slot *s, double now, uint32_t buffers, double *next_poll) {
    vuc_batcher_drained(s, now, buffers);
    *next_poll = s->busy ? vuc_next_grid_point(now, s->batch_delay) : 0;
    return (int)s->busy;
}
