"""The HTTP lane: every client connection's requests, parsed by llhttp and relayed.

`client` reads one client connection and answers its requests in order, under
the client rules; `request` reads a request head; `relay` sends a request
upstream and its answer back; `upstream` keeps the pool of upstream connections
and parses their answers; `answer` writes what goes back; `shared` holds what the
connections share (a connection knows no more of the lane than that); `site` is the
listener they come from, and keeps them. What is decided about a
request and its answer is `session_lens.policy`'s.
"""

from .site import HopSite, Lane

__all__ = ["HopSite", "Lane"]
