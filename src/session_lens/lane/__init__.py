"""The HTTP lane: every client connection's requests, parsed by llhttp and relayed.

`site` is the listener and keeps the connections; `shared` holds what they share.
Within one connection: `client` owns its socket and answers its requests in order
under the client rules; `reader` parses them (`request` reads a head); `relay` answers
each here or sends it upstream (`upstream` keeps the pool and parses answers);
`respond` brings the answer back; `writer` is what goes to the client, and how the
connection ends; `answer` writes heads and bodies; `connection` is the connection as
those parts see it. What is decided about a request and its answer is
`session_lens.policy`'s.
"""

from .site import HopSite, Lane

__all__ = ["HopSite", "Lane"]
