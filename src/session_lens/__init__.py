"""session-lens: a sidecar HTTP proxy that explains why a session was not found."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("session-lens")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
