# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="session-lens" \
      org.opencontainers.image.description="A sidecar HTTP proxy that explains why a session was not found"
RUN useradd --create-home --uid 10001 lens
COPY --from=build /install /usr/local
USER 10001
WORKDIR /home/lens
# Configuration comes from SESSION_LENS_* variables (see the README); these two
# make the listeners reachable from outside the container, so the admin listener
# asks for SESSION_LENS_ADMIN_TOKEN (session-lens refuses to start without it).
ENV SESSION_LENS_LISTEN=0.0.0.0:8080 \
    SESSION_LENS_ADMIN_LISTEN=0.0.0.0:9464 \
    PYTHONUNBUFFERED=1
EXPOSE 8080 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["session-lens"]
CMD ["serve"]
