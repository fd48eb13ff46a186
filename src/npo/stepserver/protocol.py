"""Wire format shared by the client, the zygote and its workers.

Every message is one *frame*: a 4-byte big-endian length, then that many bytes of UTF-8
JSON. The request frame's length prefix is sent on its own `sendmsg` so the client's
stdout/stderr descriptors (SCM_RIGHTS) ride on those 4 bytes; the body follows with
`sendall`, so a large request never depends on one `sendmsg` carrying everything.

Stdlib only, imported by the client: keep it light.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a sanity bound: results are small, configs are kilobytes
MAX_FDS = 2  # the client's stdout and stderr

# A progress event's acknowledgement: one byte, sent after the parent's callback returned.
ACK = b"\x06"


class ConnectionLost(ConnectionError):
    """The peer closed the connection before a whole frame arrived."""


def encode(message: dict[str, Any]) -> bytes:
    """A message as JSON bytes (NaN/inf allowed: metrics may hold them)."""
    return json.dumps(message, separators=(",", ":")).encode()


def recv_exact(sock: socket.socket, size: int, head: bytes = b"") -> bytes:
    """Read until `size` bytes (counting `head`, already read) or raise ConnectionLost."""
    chunks = [head]
    got = len(head)
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionLost(f"connection closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_length(length: int) -> int:
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return length


def pack(message: dict[str, Any]) -> bytes:
    """One whole frame: length prefix and body."""
    body = encode(message)
    return _LEN.pack(_check_length(len(body))) + body


def send_frame(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one frame; `fds` (if any) travel with its length prefix."""
    body = encode(message)
    prefix = _LEN.pack(_check_length(len(body)))
    if fds:
        socket.send_fds(sock, [prefix], list(fds))
    else:
        sock.sendall(prefix)
    sock.sendall(body)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Receive one frame (no descriptors expected)."""
    (length,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    return json.loads(recv_exact(sock, _check_length(length)))


def recv_frame_with_fds(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Receive one frame and the descriptors sent with its length prefix."""
    head, fds, flags, _ = socket.recv_fds(sock, _LEN.size, MAX_FDS)
    if flags & getattr(socket, "MSG_CTRUNC", 0):
        for fd in fds:
            _close_quietly(fd)
        raise ConnectionError("descriptors were truncated in transit")
    if not head:
        raise ConnectionLost("connection closed before a request")
    try:
        (length,) = _LEN.unpack(recv_exact(sock, _LEN.size, head))
        return json.loads(recv_exact(sock, _check_length(length))), list(fds)
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
