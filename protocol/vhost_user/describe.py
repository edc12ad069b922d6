"""Log lines: one readable line per message, fds counted, payloads summarised."""

from __future__ import annotations

from .codec import Message
from .constants import _name
from .payloads import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    InflightDesc,
    IotlbMsg,
    Log,
    MemoryTable,
    Payload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
)

# ---------------------------------------------------------------------------
# Log lines




def _describe_payload(p: Payload | None) -> str:
    if p is None:
        return ""
    if isinstance(p, U64):
        return f"u64={p.value:#x}"
    if isinstance(p, VringState):
        return f"index={p.index} num={p.num}"
    if isinstance(p, VringAddr):
        return (
            f"index={p.index} flags={p.flags:#x} desc={p.desc_user_addr:#x} "
            f"used={p.used_user_addr:#x} avail={p.avail_user_addr:#x} log={p.log_guest_addr:#x}"
        )
    if isinstance(p, MemoryTable):
        regions = " ".join(
            f"[gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
            f"uva={r.userspace_addr:#x} off={r.mmap_offset:#x}]"
            for r in p.regions
        )
        return f"nregions={len(p.regions)}" + (f" {regions}" if regions else "")
    if isinstance(p, SingleMemoryRegion):
        r = p.region
        return (
            f"gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} "
            f"uva={r.userspace_addr:#x} off={r.mmap_offset:#x}"
        )
    if isinstance(p, ConfigSpace):
        return f"offset={p.offset} size={p.size} flags={p.flags:#x}"
    if isinstance(p, Log):
        return f"mmap_size={p.mmap_size:#x} mmap_offset={p.mmap_offset:#x}"
    if isinstance(p, InflightDesc):
        return (
            f"mmap_size={p.mmap_size:#x} mmap_offset={p.mmap_offset:#x} "
            f"num_queues={p.num_queues} queue_size={p.queue_size}"
        )
    if isinstance(p, DeviceStateTransfer):
        return f"direction={p.direction} phase={p.phase}"
    if isinstance(p, IotlbMsg):
        return (
            f"iova={p.iova:#x} size={p.size:#x} uaddr={p.uaddr:#x} "
            f"perm={p.perm} type={p.msg_type}"
        )
    if isinstance(p, VringArea):
        return f"u64={p.u64:#x} size={p.size:#x} offset={p.offset:#x}"
    if isinstance(p, SharedObject):
        return f"uuid={p.as_uuid()}"
    if isinstance(p, ShmemConfig):
        return f"nregions={p.nregions} sizes={list(p.memory_sizes)}"
    if isinstance(p, ShmemMap):
        return (
            f"shmid={p.shmid} fd_offset={p.fd_offset:#x} shm_offset={p.shm_offset:#x} "
            f"len={p.length:#x} flags={p.flags:#x}"
        )
    return f"len={len(p.data)}"


def describe(msg: Message) -> str:
    """One log-line summary: name, flags, key fields, fd count (no config bytes)."""
    parts = [_name(msg.request)]
    if msg.is_reply:
        parts.append("reply")
    if msg.need_reply:
        parts.append("need_reply")
    fields = _describe_payload(msg.payload)
    if fields:
        parts.append(fields)
    if msg.fds:
        parts.append(f"fds={len(msg.fds)}")
    return " ".join(parts)
