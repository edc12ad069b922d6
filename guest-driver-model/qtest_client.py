"""QEMU's qtest line protocol, from the side that plays the guest CPU.

QEMU started with ``-qtest unix:PATH`` runs no guest code on its own; a test
program plays the guest CPU instead, over a line protocol on that socket:
``outl 0xcf8 0x80000800`` / ``inl 0xcfc`` reach PCI configuration space,
``readl ADDR`` / ``writew ADDR VAL`` reach device registers (MMIO), and every
command is answered by one ``OK [VALUE]`` (or ``FAIL``/``ERR``) line, in
order.  ``irq_intercept_in ioapic`` makes QEMU report the interrupt lines that
reach the I/O APIC as asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines,
interleaved with the replies.  :class:`QtestClient` is an asyncio client of
that protocol: a reader task sorts lines into replies (resolving a FIFO of
futures, so commands may be pipelined) and interrupt events.

:class:`QtestClient` is what the virtio-pci driver model (``qtest.py``)
drives; it knows nothing of PCI or virtio.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import socket
from typing import Callable

__all__ = ["QtestError", "QtestClient"]

log = logging.getLogger(__name__)

_WIDTH = {1: "b", 2: "w", 4: "l", 8: "q"}


class QtestError(Exception):
    """QEMU refused a qtest command, or the qtest connection is gone."""



class QtestClient:
    """asyncio client of QEMU's qtest line protocol over one stream socket.

    Commands are pipelined: :meth:`send` writes the line at once and returns
    a future for its reply; replies arrive in command order.  ``IRQ`` lines
    QEMU sends on its own are passed to ``on_irq(line_number, raised)``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: collections.deque[tuple[str, asyncio.Future[list[str]]]] = collections.deque()
        self.on_irq: Callable[[int, bool], None] | None = None
        self.irq_levels: dict[int, bool] = {}
        self.commands = 0
        self.closed = False
        self._close_reason: BaseException | None = None
        self._unawaited_errors: list[BaseException] = []
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name="qtest-reader")

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> "QtestClient":
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        return cls(reader, writer)

    @classmethod
    async def adopt(cls, sock: socket.socket) -> "QtestClient":
        """Wrap an already connected stream socket (e.g. one QEMU connected to)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    # -- plumbing --------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                raw = await self._reader.readline()
                if not raw:
                    raise QtestError("QEMU closed the qtest connection")
                line = raw.decode("ascii", "replace").strip()
                if not line:
                    continue
                words = line.split()
                if words[0] == "IRQ" and len(words) == 3:
                    raised = words[1] == "raise"
                    n = int(words[2], 0)
                    self.irq_levels[n] = raised
                    if self.on_irq is not None:
                        self.on_irq(n, raised)
                    continue
                if not self._pending:
                    log.warning("qtest: unexpected line %r", line)
                    continue
                cmd, fut = self._pending.popleft()
                if fut.done():
                    continue
                if words[0] == "OK":
                    fut.set_result(words[1:])
                else:
                    fut.set_exception(QtestError(f"{cmd!r} -> {line!r}"))
        except (QtestError, OSError, asyncio.IncompleteReadError) as exc:
            self._fail_all(exc if isinstance(exc, QtestError) else QtestError(f"qtest connection lost: {exc}"))
        except asyncio.CancelledError:
            self._fail_all(QtestError("qtest client closed"))
            raise

    def _fail_all(self, exc: BaseException) -> None:
        self.closed = True
        self._close_reason = exc
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def send(self, line: str) -> "asyncio.Future[list[str]]":
        """Write one command now; the future resolves to the words after ``OK``."""
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(self._close_reason or QtestError("qtest connection closed"))
            return fut
        self._pending.append((line, fut))
        self._writer.write(line.encode("ascii") + b"\n")
        self.commands += 1
        return fut

    def send_nowait(self, line: str) -> None:
        """Fire and forget (``notify`` is synchronous); a failure is kept for :meth:`check`."""
        fut = self.send(line)

        def done(f: "asyncio.Future[list[str]]") -> None:
            if not f.cancelled() and f.exception() is not None:
                self._unawaited_errors.append(f.exception())  # type: ignore[arg-type]

        fut.add_done_callback(done)

    def check(self) -> None:
        """Raise the first error of a fire-and-forget command, if any."""
        if self._unawaited_errors:
            raise self._unawaited_errors[0]

    async def cmd(self, line: str) -> list[str]:
        return await self.send(line)

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(QtestError("qtest client closed"))
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ConnectionError):
            pass

    # -- commands --------------------------------------------------------------------------
    async def _value(self, line: str) -> int:
        words = await self.cmd(line)
        return int(words[0], 16)

    async def inb(self, port: int) -> int:
        return await self._value(f"inb {port:#x}")

    async def inw(self, port: int) -> int:
        return await self._value(f"inw {port:#x}")

    async def inl(self, port: int) -> int:
        return await self._value(f"inl {port:#x}")

    async def outb(self, port: int, value: int) -> None:
        await self.cmd(f"outb {port:#x} {value:#x}")

    async def outw(self, port: int, value: int) -> None:
        await self.cmd(f"outw {port:#x} {value:#x}")

    async def outl(self, port: int, value: int) -> None:
        await self.cmd(f"outl {port:#x} {value:#x}")

    async def mmio_read(self, addr: int, size: int) -> int:
        """``readb/w/l/q``: one guest access of ``size`` bytes."""
        return await self._value(f"read{_WIDTH[size]} {addr:#x}")

    async def mmio_write(self, addr: int, size: int, value: int) -> None:
        """``writeb/w/l/q``: one guest access of ``size`` bytes."""
        await self.cmd(f"write{_WIDTH[size]} {addr:#x} {value:#x}")

    def mmio_write_nowait(self, addr: int, size: int, value: int) -> None:
        self.send_nowait(f"write{_WIDTH[size]} {addr:#x} {value:#x}")

    async def memread(self, addr: int, size: int) -> bytes:
        """Bulk read of guest-physical memory (``b64read``)."""
        if size == 0:
            return b""
        words = await self.cmd(f"b64read {addr:#x} {size:#x}")
        return base64.b64decode(words[0]) if words else b""

    async def memwrite(self, addr: int, data: bytes) -> None:
        """Bulk write of guest-physical memory (``b64write``)."""
        if data:
            await self.cmd(f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode()}")

    async def memset(self, addr: int, size: int, value: int = 0) -> None:
        await self.cmd(f"memset {addr:#x} {size:#x} {value:#x}")

    async def irq_intercept_in(self, qom_path: str) -> None:
        await self.cmd(f"irq_intercept_in {qom_path}")
