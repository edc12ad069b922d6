"""``sched_setattr``/``sched_getattr`` through cffi, for per-thread util clamps.

glibc has no wrapper for these two system calls, so they go through
``syscall(2)`` with the architecture's numbers.  ``struct sched_attr`` is the
56-byte version that carries ``sched_util_min``/``sched_util_max``
(``SCHED_ATTR_SIZE_VER1``).  Clamp changes use ``SCHED_FLAG_KEEP_ALL`` so the
thread's policy, nice value and deadline parameters stay what QEMU set.

A kernel built without ``CONFIG_UCLAMP_TASK`` answers EOPNOTSUPP to any
clamp flag: :func:`probe_uclamp` finds that out once at start.
"""

from __future__ import annotations

import errno
import os
import platform
from dataclasses import dataclass

import cffi

__all__ = [
    "SchedAttr",
    "sched_getattr",
    "sched_setattr_clamp",
    "probe_uclamp",
    "UclampUnsupported",
    "SCHED_FLAG_RESET_ON_FORK",
    "SCHED_FLAG_KEEP_ALL",
    "SCHED_FLAG_UTIL_CLAMP_MIN",
    "SCHED_FLAG_UTIL_CLAMP_MAX",
    "SCHED_ATTR_SIZE",
]

SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_FLAG_KEEP_POLICY = 0x08
SCHED_FLAG_KEEP_PARAMS = 0x10
SCHED_FLAG_KEEP_ALL = SCHED_FLAG_KEEP_POLICY | SCHED_FLAG_KEEP_PARAMS
SCHED_FLAG_UTIL_CLAMP_MIN = 0x20
SCHED_FLAG_UTIL_CLAMP_MAX = 0x40
SCHED_ATTR_SIZE = 56
SCHED_DEADLINE = 6

# (sched_setattr, sched_getattr) per machine, from the kernel's syscall tables.
_SYSCALLS = {
    "x86_64": (314, 315),
    "aarch64": (274, 275),
    "riscv64": (274, 275),
}

_ffi = cffi.FFI()
_ffi.cdef(
    """
    struct sched_attr {
        uint32_t size;
        uint32_t sched_policy;
        uint64_t sched_flags;
        int32_t  sched_nice;
        uint32_t sched_priority;
        uint64_t sched_runtime;
        uint64_t sched_deadline;
        uint64_t sched_period;
        uint32_t sched_util_min;
        uint32_t sched_util_max;
    };
    long syscall(long number, ...);
    """
)
_libc = _ffi.dlopen(None)
assert _ffi.sizeof("struct sched_attr") == SCHED_ATTR_SIZE


class UclampUnsupported(OSError):
    """This kernel has no per-task util clamps (CONFIG_UCLAMP_TASK is off)."""


@dataclass(frozen=True, slots=True)
class SchedAttr:
    policy: int
    flags: int
    nice: int
    priority: int
    util_min: int
    util_max: int
    runtime: int = 0  # a fair thread's slice in ns (Linux 6.12+), or a deadline thread's runtime


def _numbers() -> tuple[int, int]:
    try:
        return _SYSCALLS[platform.machine()]
    except KeyError:
        raise OSError(errno.ENOSYS, f"sched_setattr number unknown for {platform.machine()}") from None


def sched_getattr(tid: int) -> SchedAttr:
    attr = _ffi.new("struct sched_attr *")
    rc = _libc.syscall(_numbers()[1], _ffi.cast("int", tid), attr, _ffi.cast("unsigned int", SCHED_ATTR_SIZE),
                       _ffi.cast("unsigned int", 0))
    if rc != 0:
        e = _ffi.errno
        raise OSError(e, f"sched_getattr({tid}): {os.strerror(e)}")
    return SchedAttr(attr.sched_policy, attr.sched_flags, attr.sched_nice, attr.sched_priority,
                     attr.sched_util_min, attr.sched_util_max, attr.sched_runtime)


def sched_setattr_clamp(tid: int, util_min: int | None, util_max: int | None = None, *,
                        reset_on_fork: bool | None = True) -> None:
    """Set one or both clamps of thread ``tid``, keeping its policy and parameters.

    ``reset_on_fork`` True sets SCHED_RESET_ON_FORK, so threads QEMU spawns
    from the vCPU thread do not inherit a boost they never asked for; False
    clears it; None leaves it.  The kernel takes the flag only with an
    explicit policy (SCHED_FLAG_KEEP_POLICY keeps the old flag as well), so
    the thread's policy, priority and nice are read and handed back.
    """
    attr = _ffi.new("struct sched_attr *")
    attr.size = SCHED_ATTR_SIZE
    flags = SCHED_FLAG_KEEP_ALL
    if reset_on_fork is not None:
        cur = sched_getattr(tid)
        if cur.policy != SCHED_DEADLINE:  # a deadline thread's parameters cannot be handed back: leave it
            attr.sched_policy, attr.sched_priority, attr.sched_nice = cur.policy, cur.priority, cur.nice
            flags = SCHED_FLAG_KEEP_PARAMS | (SCHED_FLAG_RESET_ON_FORK if reset_on_fork else 0)
    if util_min is not None:
        flags |= SCHED_FLAG_UTIL_CLAMP_MIN
        attr.sched_util_min = util_min
    if util_max is not None:
        flags |= SCHED_FLAG_UTIL_CLAMP_MAX
        attr.sched_util_max = util_max
    attr.sched_flags = flags
    rc = _libc.syscall(_numbers()[0], _ffi.cast("int", tid), attr, _ffi.cast("unsigned int", 0))
    if rc != 0:
        e = _ffi.errno
        cls = UclampUnsupported if e == errno.EOPNOTSUPP else OSError
        raise cls(e, f"sched_setattr({tid}, util_min={util_min}, util_max={util_max}): {os.strerror(e)}")


def probe_uclamp(tid: int = 0) -> str | None:
    """None if per-task clamps work here, else the reason they do not.

    Sets the calling thread's clamps to what they already are: a no-op where
    supported, EOPNOTSUPP where the kernel lacks CONFIG_UCLAMP_TASK.
    """
    try:
        cur = sched_getattr(tid)
        sched_setattr_clamp(tid, cur.util_min, cur.util_max, reset_on_fork=None)
    except UclampUnsupported:
        return "kernel has no per-task util clamps (CONFIG_UCLAMP_TASK is not set): EOPNOTSUPP"
    except OSError as exc:
        return f"sched_setattr failed: {exc.strerror or exc}"
    return None
