"""The image's HEALTHCHECK: 0 when /healthz on the admin listener answers 200, else 1.

The listener is the one SESSION_LENS_ADMIN_LISTEN names (the image's is 0.0.0.0:9464),
reached on loopback when it is a wildcard address.
"""

import os
import sys
import urllib.request

address = os.environ.get("SESSION_LENS_ADMIN_LISTEN", "127.0.0.1:9464")
host, _, port = address.rpartition(":")
host = host.strip("[]")
if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard is reached on loopback
    host = "127.0.0.1"
elif ":" in host:
    host = f"[{host}]"
try:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:
    print(f"healthcheck: {address}: {exc}", file=sys.stderr)
    sys.exit(1)
