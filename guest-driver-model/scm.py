"""The front-end's side of the unix socket: messages with fds attached (SCM_RIGHTS).

Written on the standard library's ``socket.send_fds``/``socket.recv_fds``
rather than shared with the back-end's transport: the guest model is the
peer, and a peer that shares the back-end's code would hide the very interop
bugs it is there to find.
"""

from __future__ import annotations

import os
import socket
from typing import Sequence

__all__ = ["send_with_fds", "recv_with_fds", "MAX_FDS"]

#: more than any back-end message carries to us (a back-end request: at most one)
MAX_FDS = 8


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send all of ``data``, ``fds`` riding on its first byte."""
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_with_fds(sock: socket.socket, size: int = 65536) -> tuple[bytes, list[int]]:
    """One receive: the bytes and every fd that came with them."""
    data, fds, flags, _ = socket.recv_fds(sock, size, MAX_FDS)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the back-end sent more fds than one message carries")
    return data, list(fds)
