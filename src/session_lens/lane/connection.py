"""The client connection as its parts see it: the reader of its requests, the relay
of one request upstream, and the answer on its way back."""

from typing import Protocol

from .request import Request
from .writer import Writer


class Client(Protocol):
    """One client connection, to the parts it is made of."""

    out: Writer
    """What goes back to the client."""
    peer: bytes
    """The client's address, for X-Forwarded-For and the logs."""
    ahead: int
    """Body bytes read and not yet sent upstream."""

    gone: bool
    """Whether the client has closed the connection."""

    def flow(self) -> None:
        """Read from the client, or not, as the upstream and the client allow."""

    def parsed(self, request: Request) -> None:
        """A request's head has been read: its turn comes in order."""

    def over_limit(self, request: Request) -> None:
        """A request's body went past `max_body_bytes`."""

    def fail(self, status: int, detail: str) -> None:
        """What the client sent cannot be read: the connection ends with `status`."""

    def websocket(self, data: bytes) -> None:
        """A WebSocket upgrade's head again, and what followed it, for aiohttp."""

    def after(self, request: Request, close: bool) -> None:
        """`request` is answered; the connection closes after it if `close`."""
