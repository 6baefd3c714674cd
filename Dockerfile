# syntax=docker/dockerfile:1
# session-lens on Debian's own Python (3.11 in bookworm). The build stage makes the
# wheels and a virtual environment of them; the runtime stage gets that environment
# and Python alone: no compilers, no pip, no caches, no embedded PostgreSQL (the
# `embedded` extra is not installed; give it database_url).
#   docker build -t session-lens .
#   docker run --read-only -e SESSION_LENS_UPSTREAM=... -e SESSION_LENS_DATABASE_URL=... \
#     -e SESSION_LENS_ADMIN_TOKEN=... session-lens

FROM debian:bookworm-slim AS build
LABEL session-lens.stage="build"
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# pip trusts the system's CAs (with any local CA the base carries), not its own copy.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --wheel-dir /wheels . \
 && python3 -m venv /opt/session-lens \
 && /opt/session-lens/bin/pip install --no-index --find-links /wheels session-lens \
 && /opt/session-lens/bin/pip uninstall --yes pip setuptools

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="session-lens" \
      org.opencontainers.image.description="A sidecar HTTP proxy that explains why a session was not found"
# The runtime trusts Debian's CAs only (upstream_ca_file adds one for an upstream).
# hadolint ignore=DL3008
RUN rm -f /usr/local/share/ca-certificates/* \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 lens \
 && useradd --uid 10001 --gid lens --home-dir /var/lib/session-lens --no-create-home \
      --shell /usr/sbin/nologin lens \
 && install -d -o lens -g lens -m 0700 /var/lib/session-lens \
 && chmod 0755 /var/tmp /run/lock
COPY --from=build /opt/session-lens /opt/session-lens
COPY deploy/image/healthcheck.py /opt/session-lens/healthcheck.py
# Configuration comes from SESSION_LENS_* variables (see the README); these make the
# listeners reachable from outside the container, so the admin listener asks for
# SESSION_LENS_ADMIN_TOKEN (session-lens refuses to start without it). All it writes
# (the observed mode's spool; temporary files with --workers) goes to the two volumes,
# and nothing else is writable by its user: the root file system may be read-only.
ENV PATH=/opt/session-lens/bin:$PATH \
    SESSION_LENS_LISTEN=0.0.0.0:8080 \
    SESSION_LENS_ADMIN_LISTEN=0.0.0.0:9464 \
    SESSION_LENS_DATA_DIR=/var/lib/session-lens \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/session-lens", "/tmp"]
USER 10001:10001
WORKDIR /var/lib/session-lens
EXPOSE 8080 9464
# session-lens is PID 1 and drains on SIGTERM itself (the default STOPSIGNAL).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "/opt/session-lens/healthcheck.py"]
ENTRYPOINT ["session-lens"]
CMD ["serve"]
