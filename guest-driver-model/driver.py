"""A model of the cpufreq guest driver (protocol/SPEC.md, the driver's side).

Theory of operation: at probe the driver negotiates features, reads the
config space once (generation before and after, retrying torn reads), sets up
the request queue with used-buffer interrupts suppressed, and carves a pool
of batch buffers from guest RAM.  The guest scheduler reports each vCPU's
util with :meth:`set_util` (cheap: it only marks the vCPU dirty when the
value moved past a threshold); :meth:`flush` (once per tick) reclaims used
buffers, writes one batch of the dirty vCPUs' records and kicks the device
only when EVENT_IDX says it is waiting, and then only at once for an urgent
record (a rise in demand); other records wait for more of their kind or a
deadline (SPEC 6.4).  The config is re-read only after the
device's configuration change notification.

Shared frequency page (SPEC §8): when the device offers it and the transport
has the region, the driver takes the feature and reads frequencies from the
page (:meth:`page_frequencies`, no device access at all for a real guest),
each domain under its sequence count with bounded retries; until the page is
mapped and LIVE, or when the retries run out, the cached config answers.

Energy model (SPEC §9.4): with the page the driver also takes
``F_ENERGY_MODEL`` when offered, and :meth:`energy_model` reads each
domain's power table from the page under the section's sequence count.  A
table that fails the protocol's bounds is rejected whole and counted by
reason (``stats.em_rejected``); the guest then has no energy model.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import energy as em
from vhost_user_cpufreq.protocol.errors import RecordError, RemoteProtocolError
from vhost_user_cpufreq.protocol.virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

from .transport import DriverTransport

__all__ = ["CpufreqDriver", "DriverStats", "VIRTIO_F_VERSION_1"]

VIRTIO_F_VERSION_1 = 32
_GEN = struct.Struct("<I")
CONFIG_TRIES = 16  # as the Linux module (linux/virtio_cpufreq.c, vcf_read_config)


@dataclass
class DriverStats:
    batches: int = 0
    records: int = 0
    kicks: int = 0
    config_refreshes: int = 0
    torn_reads: int = 0
    config_unstable: int = 0  # refreshes given up after every try was torn; the cached config stayed (SPEC 5.2)
    queue_full: int = 0
    deferred_kicks: int = 0  # flushes whose kick (asked for by the device) was held back (SPEC 6.4)
    urgent_kicks: int = 0
    page_reads: int = 0  # domains read from the shared frequency page
    page_retries: int = 0  # reads retried: the device was updating the entry (SPEC 8.2)
    page_fallbacks: int = 0  # frequency reads answered from config space: page absent, not LIVE or busy
    em_reads: int = 0  # energy models read from the page and accepted
    em_retries: int = 0  # section reads retried: the device was rewriting it
    em_rejected: dict[str, int] = field(default_factory=dict)  # reason -> energy models refused


class CpufreqDriver:
    def __init__(
        self,
        transport: DriverTransport,
        *,
        queue_size: int = 64,
        util_threshold: int = 8,
        event_idx: bool = True,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        first_seq: int = 0,
        urgent_delta: int = 128,
        lazy_records: int = 32,
        lazy_deadline_ns: int = 32_000_000,
        freq_page: bool = True,
        page_tries: int = 16,
    ) -> None:
        self.t = transport
        self.want_freq_page = freq_page
        self.page_tries = page_tries
        # Notification policy (SPEC 6.4): a rise of at least urgent_delta (util, or
        # 1/8 of a frequency request) is urgent and kicked at once; other records
        # kick once lazy_records wait or the oldest waited lazy_deadline_ns.
        # lazy_records=0 kicks whenever the device asks (no deferral).
        self.urgent_delta = urgent_delta
        self.lazy_records = lazy_records
        self.lazy_deadline_ns = lazy_deadline_ns
        self._owed_since: int | None = None  # when a kick the device asked for was first held back
        self._owed_records = 0
        self.queue_size = queue_size
        self.util_threshold = util_threshold
        self.want_event_idx = event_idx
        self.clock_ns = clock_ns
        self.stats = DriverStats()
        self.seq = first_seq
        self.config: abi.DeviceConfig | None = None
        self.features = 0
        self._resync = True
        self._sent: list[int] = []
        self._sent_perf: list[int] = []
        self._util: list[int] = []
        self._perf: list[int] = []
        self._dirty: dict[int, None] = {}  # insertion-ordered set
        self._free: list[int] = []
        self._inflight: dict[int, int] = {}  # head -> buffer gpa
        self._buf_size = 0
        self._config_dirty = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None
        self.config_changed = asyncio.Event()  # set after each refresh caused by a notification

    # -- probe ------------------------------------------------------------------------
    async def probe(self) -> None:
        offered = await self.t.device_features()
        if not offered & (1 << VIRTIO_F_VERSION_1):
            raise RemoteProtocolError("no-version-1", "device does not offer VIRTIO_F_VERSION_1")
        want = 1 << VIRTIO_F_VERSION_1 | 1 << abi.F_PERF_REQUEST | 1 << VIRTIO_RING_F_INDIRECT_DESC
        if self.want_event_idx:
            want |= 1 << VIRTIO_RING_F_EVENT_IDX
        if self.want_freq_page and (self.t.shm_length(abi.FREQ_PAGE_SHMID) or 0) >= abi.FREQ_PAGE_SIZE:
            want |= 1 << abi.F_FREQ_PAGE | 1 << em.F_ENERGY_MODEL
        self.features = offered & want
        await self.t.set_driver_features(self.features)
        await self.refresh_config()
        assert self.config is not None
        n = self.config.num_vcpus
        self._sent = [-1] * n
        self._sent_perf = [0] * n
        self._util = [0] * n
        self._perf = [0] * n
        self.max_records = min(n, self.config.max_batch)
        self._buf_size = abi.BATCH_HEADER_SIZE + abi.RECORD_SIZE * self.max_records
        self.queue = await self.t.setup_queue(
            abi.REQUEST_QUEUE, self.queue_size, event_idx=bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))
        )
        self.queue.set_interrupt_suppression(True)
        self._free = [self.t.ram.alloc(self._buf_size, 8) for _ in range(self.queue_size)]
        self._inflight.clear()
        self._resync = True
        self._owed_since = None
        self._owed_records = 0
        self.t.set_config_callback(self._on_config_change)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def remove(self) -> None:
        """Unbind: stop listening for config changes and drop the ring views."""
        self.t.set_config_callback(None)
        # The ring's views pin the guest RAM mapping: drop them so RAM can be unmapped.
        if hasattr(self, "queue"):
            del self.queue
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except (asyncio.CancelledError, ConnectionError):
                pass  # a refresh the unbind cut short, or one the back-end's end (a killed service) failed
            self._refresher = None

    # -- config -------------------------------------------------------------------------
    async def refresh_config(self, max_tries: int = CONFIG_TRIES) -> abi.DeviceConfig:
        """Read the whole config with a generation check before and after (SPEC 5.2).

        Raises ``config-unstable`` when every try was torn: at probe that fails the
        probe; the refresher instead keeps its cached copy and waits for the next
        notification, which the device owes after the last change of a storm.
        """
        for _ in range(max_tries):
            (gen1,) = _GEN.unpack(await self.t.read_config(0, 4))
            body = await self.t.read_config(4, abi.CONFIG_SIZE - 4)
            (gen2,) = _GEN.unpack(await self.t.read_config(0, 4))
            if gen1 == gen2:
                self.config = abi.DeviceConfig.decode(_GEN.pack(gen1) + body)
                self.stats.config_refreshes += 1
                return self.config
            self.stats.torn_reads += 1
        raise RemoteProtocolError("config-unstable", f"generation kept changing over {max_tries} reads")

    def _on_config_change(self) -> None:
        self._config_dirty.set()

    async def _refresh_loop(self) -> None:
        while True:
            await self._config_dirty.wait()
            self._config_dirty.clear()
            try:
                await self.refresh_config()
            except RemoteProtocolError as e:
                if e.reason != "config-unstable":
                    raise
                # A device changing faster than this guest can read three words (a slow guest,
                # or a hostile device): as the Linux module does, keep the cached copy.  The
                # device's final notification of the storm (SPEC 5.1) brings the next try.
                self.stats.config_unstable += 1
                continue
            self.config_changed.set()

    @property
    def freq_page(self) -> bool:
        """Whether the driver took the shared frequency page."""
        return bool(self.features & (1 << abi.F_FREQ_PAGE))

    async def page_frequencies(self) -> tuple[abi.PageDomain, ...] | None:
        """Every domain's entry from the shared page, or None: use config space (SPEC 8.2)."""
        if not self.freq_page:
            return None
        t, shmid = self.t, abi.FREQ_PAGE_SHMID
        header = struct.pack("<4I", *[await t.shm_read32(shmid, off) for off in (0, 4, 8, 12)])
        try:
            h = abi.decode_page_header(header)
        except RecordError:
            self.stats.page_fallbacks += 1  # not mapped yet (reads 0), or not a page we know
            return None
        if not h.live:
            self.stats.page_fallbacks += 1
            return None
        out = []
        for i in range(h.num_domains):
            off = abi.page_domain_offset(i)
            for _ in range(self.page_tries):
                s1 = await t.shm_read32(shmid, off)
                w1 = await t.shm_read32(shmid, off + 4)
                w2 = await t.shm_read32(shmid, off + 8)
                s2 = await t.shm_read32(shmid, off)
                d = abi.decode_page_domain(s1, struct.pack("<4I", s1, w1, w2, 0), s2)
                if d is not None:
                    out.append(d)
                    self.stats.page_reads += 1
                    break
                self.stats.page_retries += 1
            else:
                self.stats.page_fallbacks += 1  # the device kept writing (or died mid-update)
                return None
        return tuple(out)

    async def energy_model(self) -> em.EnergyModel | None:
        """Every domain's power table from the page (SPEC 9.4), or None: no energy model.

        Read once the page is LIVE (at probe, and after a topology change): the section's count,
        its words, the count again, retried a bounded number of times while the device writes."""
        if not self.features & (1 << em.F_ENERGY_MODEL) or not self.freq_page or self.config is None:
            return None
        t, shmid = self.t, abi.FREQ_PAGE_SHMID
        try:
            h = abi.decode_page_header(struct.pack("<4I", *[await t.shm_read32(shmid, o) for o in (0, 4, 8, 12)]))
        except RecordError:
            return None  # not placed yet: the caller tries again once it is
        if not h.live:
            return None
        for _ in range(self.page_tries):
            s1 = await t.shm_read32(shmid, em.EM_OFFSET)
            words = [s1, *[await t.shm_read32(shmid, em.EM_OFFSET + 4 * k) for k in range(1, em.EM_SIZE // 4)]]
            s2 = await t.shm_read32(shmid, em.EM_OFFSET)
            try:
                model = em.decode_energy_model(s1, struct.pack(f"<{len(words)}I", *words), s2, self.config.domains)
            except RecordError as exc:
                self.stats.em_rejected[exc.reason] = self.stats.em_rejected.get(exc.reason, 0) + 1
                return None
            if model is not None:
                self.stats.em_reads += 1
                return model
            self.stats.em_retries += 1
        self.stats.em_rejected["em-torn"] = self.stats.em_rejected.get("em-torn", 0) + 1
        return None

    async def current_khz(self, vcpu: int) -> int:
        """The host frequency behind ``vcpu`` now: from the page when it is in use, else the cached config."""
        assert self.config is not None
        page = await self.page_frequencies()
        dom = self.config.vcpu_domain[vcpu]
        if page is not None and dom < len(page):
            return page[dom].cur_khz
        return self.config.domains[dom].cur_khz

    def cur_khz(self, vcpu: int) -> int:
        """The frequency the guest believes ``vcpu`` runs at, from the cached config (no device access)."""
        assert self.config is not None
        return self.config.domain_of(vcpu).cur_khz

    # -- requests -----------------------------------------------------------------------
    def set_util(self, vcpu: int, util: int, perf_khz: int = 0) -> None:
        util = max(0, min(abi.UTIL_SCALE, util))
        self._util[vcpu] = util
        self._perf[vcpu] = perf_khz
        if abs(util - self._sent[vcpu]) >= self.util_threshold or (util != self._sent[vcpu] and util in (0, 1024)):
            self._dirty[vcpu] = None

    def _reclaim(self) -> None:
        for head, _ in self.queue.reclaim():
            self._free.append(self._inflight.pop(head))

    def flush(self) -> int:
        """Send the dirty vCPUs' records; returns how many records went out.

        Call it every tick even when nothing changed: a held-back kick whose
        deadline passed is sent from here.
        """
        if not self._dirty:
            if self._owed_since is not None:
                self._maybe_kick(False, 0)
            return 0
        self._reclaim()
        mem = self.t.ram.memory
        sent = 0
        urgent = False
        while self._dirty:
            if not self._free or self.queue.num_free < 1:
                self.stats.queue_full += 1
                break  # the newest values stay dirty and go with the next flush
            vcpus = []
            for v in self._dirty:
                vcpus.append(v)
                if len(vcpus) == self.max_records:
                    break
            for v in vcpus:
                del self._dirty[v]
                urgent = urgent or self._is_urgent(v)
            records = tuple(abi.Record(v, self._util[v], self._perf[v]) for v in vcpus)
            flags = abi.BATCH_F_RESYNC if self._resync else 0
            data = abi.encode_batch(abi.Batch(self.seq, self.clock_ns(), records, flags))
            gpa = self._free.pop()
            mem.view(gpa, len(data))[:] = data
            head = self.queue.add([(gpa, len(data))])
            self._inflight[head] = gpa
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            self._resync = False
            for v in vcpus:
                self._sent[v] = self._util[v]
                self._sent_perf[v] = self._perf[v]
            sent += len(records)
            self.stats.batches += 1
        self.queue.publish()
        self._maybe_kick(urgent, sent)
        self.stats.records += sent
        return sent

    def kick_held(self) -> bool:
        """Send a kick held back under SPEC 6.4 now (driver unbind, end of a run); True if one was."""
        if self._owed_since is None:
            return False
        self._owed_since = None
        self._owed_records = 0
        self.stats.kicks += 1
        self.t.notify(abi.REQUEST_QUEUE)
        return True

    def _is_urgent(self, v: int) -> bool:
        """A request for more speed that matters: latency counts (the ramp-up case)."""
        if self._sent[v] < 0:
            return True  # the device knows nothing of this vCPU yet
        if self._util[v] - self._sent[v] >= self.urgent_delta:
            return True
        perf, before = self._perf[v], self._sent_perf[v]
        return perf > before + (before >> 3)  # a frequency request up by more than 1/8

    def _maybe_kick(self, urgent: bool, records: int) -> None:
        if not (self.queue.kick_needed() or self._owed_since is not None):
            return  # the device is not waiting for a kick (it will drain on its own)
        now = self.clock_ns()
        if self._owed_since is None:
            self._owed_since = now
        self._owed_records += records
        if (urgent or self.lazy_records == 0 or self._owed_records >= self.lazy_records
                or now - self._owed_since >= self.lazy_deadline_ns):
            self._owed_since = None
            self._owed_records = 0
            self.stats.kicks += 1
            self.stats.urgent_kicks += urgent
            self.t.notify(abi.REQUEST_QUEUE)
        elif records:
            self.stats.deferred_kicks += 1
