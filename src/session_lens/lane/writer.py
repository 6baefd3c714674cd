"""What goes back to one client: answers written and counted, the client's
backpressure, and how the connection ends — at once, or lingering so that a client
still sending reads its answer rather than a reset."""

import asyncio
import fcntl
import logging
import struct
import termios

from .shared import Shared

log = logging.getLogger("session_lens.proxy")

LINGER_BYTES = 1 << 26
"""The most a client may still send once its connection is closing, read and dropped."""
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
"""The ioctl that reads a socket's unacknowledged bytes (SIOCOUTQ, the same number)."""


class Writer:
    """The client's side of a connection, as the hop writes to it."""

    def __init__(self, lane: Shared, transport: asyncio.Transport) -> None:
        self._lane = lane
        self.transport = transport
        self.writable: asyncio.Future[None] | None = None
        """Pending while the client does not take what it was sent."""
        self.blocked = False
        """Whether the client is not reading what it was sent (`writable` is pending)."""
        self.shut = False
        """Whether the write side is shut or closing: nothing more is written."""
        self.lingering: asyncio.TimerHandle | None = None
        """Closing: what the client still sends is read and dropped until this fires."""
        self._lingered = 0
        self._written = 0
        """Bytes written, the transport's buffer included."""
        self._taken = 0
        """Bytes the client had taken when it last took any."""
        self._taking_since = lane.loop.time()

    def write(self, data: bytes) -> None:
        """Write to the client; what it has taken of it tells the send timeout."""
        if not self.shut:
            self._written += len(data)
            self.transport.write(data)

    def pause(self) -> None:
        """The transport's buffer is full: writing waits."""
        if not self.blocked:
            self.blocked = True
            self.writable = self._lane.loop.create_future()

    def resume(self) -> None:
        """The client took enough: writing goes on."""
        self.blocked = False
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def lost(self) -> None:
        """The connection is gone: nothing waits to write, nor lingers."""
        self.resume()
        if self.lingering is not None:
            self.lingering.cancel()

    def dropped(self, size: int) -> None:
        """`size` bytes came from a client whose connection is closing."""
        self._lingered += size
        if self._lingered > LINGER_BYTES:
            self.transport.close()

    def close(self, linger: bool, gone: bool) -> bool:
        """Close once what was written is out; True when it lingers, reading to drop.

        With `linger`, when the client may still be sending, the write side is shut
        first and what comes is read and dropped for up to `lingering_timeout` (closed
        at once, the client could get a reset for its answer).
        """
        if self.shut:
            return False
        self.shut = True
        transport = self.transport
        if not linger or gone or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return False
        transport.write_eof()
        self.lingering = self._lane.loop.call_later(self._lane.lingering_timeout, transport.close)
        return True

    def cut_if_stalled(self, now: float, peer: bytes) -> bool:
        """Abort the connection if its client has taken nothing for `send_timeout`: its
        requests and their upstream connections go with it."""
        transport = self.transport
        pending = transport.get_write_buffer_size()
        if pending:  # what waits in the kernel is not taken either
            pending += _unsent_in_kernel(transport)
        taken = self._written - pending
        if not pending or taken != self._taken:
            self._taken = taken
            self._taking_since = now
            return False
        if now - self._taking_since < self._lane.send_timeout:
            return False
        log.info(
            "client took nothing in time", extra={"peer": peer.decode(), "unsent_bytes": pending}
        )
        transport.abort()
        return True


def _unsent_in_kernel(transport: asyncio.Transport) -> int:
    """The bytes of a TCP socket's send queue its peer has not acknowledged (Linux's
    SIOCOUTQ); 0 where that cannot be read."""
    sock = transport.get_extra_info("socket")
    if sock is None or _OUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    unsent: int = struct.unpack("i", raw)[0]
    return unsent
