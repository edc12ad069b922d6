"""The C data plane's interface, in one place for both ways it is built.

``CDEFS`` declares to cffi what Python may call and the layouts it shares with
C (``vuc.h``, ``engine.h``, ``slot.h`` define them for C).  Two builds use it:

* ``build_ffi.py``: cffi's out-of-line API mode, run by setuptools when the
  package is built (``setup.py``), gives the extension module
  ``vhost_user_cpufreq.backend.dataplane._vuc`` (what a wheel carries);
* ``library.py``: the run-time build, cffi's ABI mode over a shared library
  the system's C compiler makes from the same ``SOURCES`` (no Python headers
  needed), for a tree without the extension and for the sanitized build.

This module imports nothing of the package: ``build_ffi.py`` loads it by path
while the package is being built.  ``source_hash()`` names a build of these
sources: the extension carries it, so a stale one (sources edited after an
editable install) is noticed and not run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: every C file of the data plane, compiled into one library (tests/test_twins.py lists each one)
SOURCES = tuple(sorted(HERE.glob("*.c")))
HEADERS = tuple(sorted(HERE.glob("*.h")))
#: what the extension's generated C includes before cffi's declarations
PREAMBLE_INCLUDES = '#include "vuc.h"\n#include "engine.h"\n#include "slot.h"\n'
#: the extension's module name (the prebuilt data plane)
EXTENSION = "vhost_user_cpufreq.backend.dataplane._vuc"
#: compile and link flags shared by both builds (the run-time build adds -shared -fPIC -Werror)
CFLAGS = ("-O2", "-std=gnu11", "-pthread", "-Wall", "-Wextra")
LIBS = ("m", "rt")

CDEFS = """
    typedef struct { uint64_t gpa; uint64_t size; uint8_t *host; } vuc_region;
    typedef struct {
        uint8_t *desc; uint16_t *avail; uint8_t *used;
        uint32_t size, indirect, max_chain_bytes, max_indirect, num_vcpus, perf_request;
        const vuc_region *regions; uint32_t nregions;
        uint32_t last_avail, avail_shadow, used_idx, broken;
    } vuc_queue;
    typedef struct { uint32_t entries, records, rejects, descriptors, spent, more, returned; } vuc_result;
    const char *vuc_reason_name(int code);
    int vuc_abi_sizes(void);
    uint64_t vuc_drain(vuc_queue *q, uint64_t cursor, uint32_t budget, uint32_t num_vcpus,
                       uint32_t perf_request, void *entries, uint8_t *records,
                       uint32_t *rejects, uint8_t *scratch, vuc_result *res);

    /* engine.h, slot.h: the clamp engine and the kick lane */
    typedef struct { int32_t vcpu; int32_t value; int32_t reason; } vuc_change;
    typedef struct { int32_t vcpu, pcpu_cap, vcpu_cap, cap; int64_t max_khz; } vuc_placement;
    typedef struct vuc_engine vuc_engine;
    vuc_engine *vuc_engine_new(void);
    void vuc_engine_free(vuc_engine *e);
    int vuc_engine_configure(vuc_engine *e, uint32_t n, const vuc_placement *p, int32_t floor, int32_t ceiling,
                             int32_t hysteresis, double min_interval, double stale_after, double headroom);
    void vuc_engine_set_thread(vuc_engine *e, int32_t vcpu, int32_t tid);
    void vuc_engine_set_actuation(vuc_engine *e, int32_t actuate);
    uint32_t vuc_engine_record(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now,
                               vuc_change *out);
    uint32_t vuc_engine_tick(vuc_engine *e, double now, vuc_change *out);
    int vuc_engine_next_deadline(vuc_engine *e, double *due);
    uint32_t vuc_engine_release_all(vuc_engine *e, vuc_change *out);
    void vuc_engine_applied(vuc_engine *e, int32_t *out);
    typedef struct {
        int32_t vcpu, wanted, applied, has_record, pending, pad;
        double changed_at, record_at;
    } vuc_vcpu_state;
    void vuc_engine_get_state(vuc_engine *e, vuc_vcpu_state *out);
    int vuc_engine_set_state(vuc_engine *e, uint32_t n, const vuc_vcpu_state *in);

    typedef struct { uint16_t kind, reason; uint32_t head, seq, mask; uint16_t nbad, ntotal; int32_t err; } vuc_event;
    typedef struct { uint32_t util, perf_khz; double updated; uint64_t mark; uint32_t fresh, pad; } vuc_vstate;
    typedef struct {
        vuc_queue *q;
        uint8_t *entries, *records, *scratch;
        uint32_t *rejects;
        vuc_engine *engine;
        uint64_t *stamps;
        vuc_vstate *vs;
        int32_t kick_fd, call_fd;
        uint32_t budget, num_vcpus, perf_request, event_idx, max_ahead;
        double batch_delay;
        double bounds[13];
        uint64_t cursor;
        int32_t signalled;
        int32_t seq_has, off_has;
        uint32_t seq_last, seq_undecoded;
        int64_t min_off, last_age;
        uint64_t seq_lost, seq_stale;
        uint64_t kicks, accepted, batches, drains, interrupts, interrupts_dropped, polls;
        uint64_t rejected[19];
        uint64_t clamps_applied, clamps_recorded, clamp_failed, memory_faults;
        uint64_t clamp_errno[64];
        uint64_t k2d[14];
        double k2d_sum;
        vuc_event ev[64];
        uint32_t ev_head, ev_tail;
        uint64_t ev_dropped;
        double win_start, deadline;
        double engine_due;
        uint32_t win_buffers, busy;
        int32_t again, uclamp_refused, id;
    } vuc_slot;
    typedef struct vuc_lane vuc_lane;
    vuc_lane *vuc_lane_new(int notice_fd, uint64_t slice_ns);
    void vuc_lane_sched(const vuc_lane *l, int32_t *tid, uint64_t *slice_ns, int32_t *err);
    void vuc_lane_free(vuc_lane *l);
    int vuc_lane_attach(vuc_lane *l, vuc_slot *s);
    void vuc_lane_detach(vuc_lane *l, vuc_slot *s);
    void vuc_lane_set_call(vuc_lane *l, vuc_slot *s, int fd);
    uint32_t vuc_lane_events(vuc_lane *l, vuc_slot *s, vuc_event *out, uint32_t max);
    void vuc_lane_snapshot(vuc_lane *l, const vuc_slot *s, vuc_slot *out);
    int vuc_lane_abi(void);
    int vuc_busy_rule(vuc_slot *s, double now, uint32_t buffers, double *next_poll);
    int vuc_ring_rule(vuc_slot *s, int op, uint32_t arg);
    void vuc_actuate_rule(vuc_slot *s, int32_t vcpu, int32_t value);

    /* guard.c */
    int vuc_guard_install(void);
    int32_t vuc_guard_add(const void *start, uint64_t len);
    void vuc_guard_remove(int32_t id);
    uint64_t vuc_guard_faults(int32_t id);
    uint64_t vuc_guard_faults_in(const void *start, uint64_t len);
    void vuc_guard_stats(uint64_t *epoch, uint64_t *stray, uint64_t *fatal);
    uint64_t vuc_guard_epoch(void);
    int vuc_eventfd_signal(int fd);
    int64_t vuc_eventfd_drain(int fd);
"""

#: only in the extension: the source_hash() it was built from
CDEFS_PREBUILT = "const char *vuc_source_hash(void);"


def source_hash() -> str:
    """A hash of the C sources, headers and declarations: what a build of the data plane is a build of."""
    h = hashlib.sha256()
    for f in (*SOURCES, *HEADERS):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(CDEFS.encode())
    return h.hexdigest()[:16]
