"""The HTTP lane: every client connection's requests, parsed by llhttp and relayed.

`client` reads and answers one client connection, `upstream` keeps the pool of
upstream connections and parses their answers, `answer` writes what goes back,
and `site` holds what the connections share and the listener they come from.
"""

from .site import HopSite, Lane

__all__ = ["HopSite", "Lane"]
