"""The guest: tasks releasing jobs, a scheduler placing them on vCPUs, and the guest's PELT.

Theory of operation: each head task (periodic, poisson, batch) releases jobs
on its own clock; a pipeline stage's job is released when its predecessor's
completes.  A release that finds the task's previous job unfinished is
dropped (a skipped frame).  The scheduler places a waking job like Linux's
wake-up path does in spirit: the vCPU it last ran on if that one is idle,
else the idle allowed vCPU of highest capacity, else back where it was
(queued, FIFO).  ``migrate_every`` forces a move to another allowed vCPU.
A task's PELT util and util_est move with it, so the vCPU it lands on shows
the task's util at once in the guest while the host's view of that vCPU
thread is still cold: the case the device exists for.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from .pelt import Pelt, UtilEst
from .workload import TaskSpec, Workload

__all__ = ["Job", "Task", "Chain", "Guest"]


@dataclass(slots=True)
class Job:
    task: "Task"
    remaining: float  # work-ms
    work: float
    head_release: float
    deadline: float  # absolute seconds, inf: none
    ready_at: float


@dataclass(slots=True)
class Chain:
    """A head task and its stages: what counts as one frame (or one page load)."""

    name: str
    released: int = 0
    dropped: int = 0
    completed: int = 0
    on_time: int = 0
    work_on_time: float = 0.0
    latencies: list[float] = field(default_factory=list)
    finished_at: float | None = None  # batch: when its total work was done


@dataclass(slots=True)
class Task:
    spec: TaskSpec
    index: int
    chain: Chain
    allowed: tuple[int, ...]
    pelt: Pelt
    rng: random.Random
    next_release: float = 0.0
    active: bool = False  # a job released and not yet completed
    cpu: int = -1
    jobs: int = 0
    work_done: float = 0.0
    successor: "Task | None" = None
    ran: float = 0.0  # seconds run this step
    trace_pos: int = 0  # kind "trace": the next release's index
    est: UtilEst = field(default_factory=UtilEst)
    slept: bool = False  # a job completed this step: util_est takes the step's util


class Guest:
    def __init__(self, workload: Workload, vcpu_caps: list[int], dt: float) -> None:
        self.caps = vcpu_caps
        self.n = len(vcpu_caps)
        workload.check_vcpus(self.n)
        self.queues: list[list[Job]] = [[] for _ in range(self.n)]
        self.tasks: list[Task] = []
        self.chains: list[Chain] = []
        self.events: set[int] = set()  # vCPUs whose guest governor must look again
        self.migrations = 0
        by_name: dict[str, Task] = {}
        for i, spec in enumerate(workload.tasks):
            if spec.after:
                head = by_name[spec.after]
                chain = head.chain
            else:
                chain = Chain(spec.name)
                self.chains.append(chain)
            allowed = spec.vcpus if spec.vcpus is not None else tuple(range(self.n))
            first = spec.releases[0][0] if spec.releases else spec.offset_ms
            t = Task(spec, i, chain, allowed, Pelt(dt), random.Random(workload.seed * 1000 + i),
                     next_release=first / 1000 if not spec.after else math.inf)
            if spec.after:
                by_name[spec.after].successor = t
            by_name[spec.name] = t
            self.tasks.append(t)
        for t in self.tasks:  # name chains after their tail (the frame is done when render is)
            if t.successor is None and t.spec.after:
                t.chain.name = t.spec.name

    # -- releases and placement ---------------------------------------------------------
    def _work(self, t: Task) -> float:
        j = t.spec.jitter
        return t.spec.work_ms * (1 + t.rng.uniform(-j, j)) if j else t.spec.work_ms

    def release_due(self, until: float) -> None:
        for t in self.tasks:
            while t.next_release < until:
                now = t.next_release
                s = t.spec
                if s.kind == "periodic":
                    t.next_release += s.period_ms / 1000
                elif s.kind == "poisson":
                    t.next_release += t.rng.expovariate(1000 / s.mean_gap_ms)
                elif s.kind == "trace":
                    k = t.trace_pos = t.trace_pos + 1
                    t.next_release = s.releases[k][0] / 1000 if k < len(s.releases) else math.inf
                else:  # batch: the next job comes when this one is done
                    t.next_release = math.inf
                t.chain.released += 1
                if t.active:
                    t.chain.dropped += 1
                    continue
                work = s.releases[t.trace_pos - 1][1] if s.kind == "trace" else self._work(t)
                self._enqueue(t, now, now, work)

    def _enqueue(self, t: Task, now: float, head_release: float, work: float) -> None:
        s = t.spec
        tail = t
        while tail.successor is not None:
            tail = tail.successor
        dl = tail.spec.deadline_ms
        deadline = head_release + dl / 1000 if dl else math.inf
        t.active = True
        cpu = self._place(t)
        if cpu != t.cpu:
            self.migrations += t.cpu >= 0
            if t.cpu >= 0:
                self.events.add(t.cpu)
            t.cpu = cpu
        self.events.add(cpu)
        self.queues[cpu].append(Job(t, work, work, head_release, deadline, now))
        del s

    def _place(self, t: Task) -> int:
        allowed = t.allowed
        idle = [v for v in allowed if not self.queues[v]]
        force = t.spec.migrate_every and t.jobs and t.jobs % t.spec.migrate_every == 0
        if t.cpu in allowed and not force and t.cpu in idle:
            return t.cpu
        if force:
            others = [v for v in allowed if v != t.cpu]
            pool = [v for v in others if v in idle] or others
            if pool:
                # The next one round the list: over time the task visits every allowed vCPU.
                after = [v for v in pool if v > t.cpu]
                return (after or pool)[0]
        if idle:
            return max(idle, key=lambda v: (self.caps[v], v == t.cpu, -v))
        return t.cpu if t.cpu in allowed else min(allowed, key=lambda v: len(self.queues[v]))

    # -- running -------------------------------------------------------------------------
    def run(self, v: int, start: float, pieces: list[tuple[float, float]], steal: float) -> tuple[float, float]:
        """Run vCPU ``v`` over ``pieces`` of (seconds, speed in work-ms per ms) from ``start``.

        ``steal`` seconds go first to exits (busy, no guest progress).
        Returns (busy seconds, busy seconds weighted by speed)."""
        q = self.queues[v]
        busy = weighted = 0.0
        t = start
        for dur, speed in pieces:
            end = t + dur
            if steal > 0:
                s = min(steal, dur)
                steal -= s
                busy += s
                weighted += s * speed
                t += s
            while t < end - 1e-12 and q:
                job = q[0]
                if job.ready_at > t:
                    if job.ready_at >= end:
                        break
                    t = job.ready_at
                need = job.remaining / (speed * 1000) if speed > 0 else math.inf
                run = min(need, end - t)
                job.remaining -= run * speed * 1000
                job.task.ran += run
                busy += run
                weighted += run * speed
                t += run
                if run >= need - 1e-12:
                    q.pop(0)
                    self._complete(job, t)
        return busy, weighted

    def _complete(self, job: Job, now: float) -> None:
        t = job.task
        t.active = False
        t.slept = True
        t.jobs += 1
        t.work_done += job.work
        if t.successor is not None:
            nxt = t.successor
            if nxt.active:
                t.chain.dropped += 1  # the stage behind is still busy with the previous frame
            else:
                self._enqueue(nxt, now, job.head_release, self._work(nxt))
            return
        c = t.chain
        c.completed += 1
        c.latencies.append(now - job.head_release)
        if now <= job.deadline:
            c.on_time += 1
            c.work_on_time += job.work
        head = self.tasks[t.index]
        while head.spec.after:
            head = next(x for x in self.tasks if x.spec.name == head.spec.after)
        if head.spec.kind == "batch":
            if head.work_done >= head.spec.total_ms - 1e-9:
                c.finished_at = now
            else:
                head.next_release = now

    def update_pelt(self, dt: float, scale: list[float]) -> None:
        """The guest's per-task PELT; ``scale`` is each vCPU's capacity * f / f_max (as the guest knows it)."""
        for t in self.tasks:
            t.pelt.step(t.ran / dt, scale[t.cpu] if t.cpu >= 0 else 0.0)
            t.ran = 0.0
            if t.slept:
                t.est.dequeue(t.pelt.util)
                t.slept = False

    def vcpu_boost(self, v: int) -> int:
        """The guest run queue's uclamp_min: the highest of its runnable tasks'."""
        return max((j.task.spec.uclamp_min for j in self.queues[v]), default=0)

    def vcpu_util(self) -> list[float]:
        """Each vCPU's cfs util: the util_avg of the tasks that last ran there (blocked util stays with its
        CPU), or the util_est of those queued there if larger."""
        out = [0.0] * self.n
        for t in self.tasks:
            if t.cpu >= 0:
                out[t.cpu] += t.pelt.util
        for v, q in enumerate(self.queues):
            out[v] = max(out[v], sum(j.task.est.ewma for j in q))
        return out
