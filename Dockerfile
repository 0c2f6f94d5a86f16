# syntax=docker/dockerfile:1
# squirro-proxy in a container: a sidecar next to an application, or a small service of its own.
#
#   docker build -t squirro-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -e SQUIRRO_CLUSTER=https://squirro.example.com \
#     -e SQUIRRO_TOKEN_FILE=/run/secrets/squirro_token \
#     -e SQUIRRO_PROXY_CLIENT_TOKEN_FILE=/run/secrets/squirro_proxy_client_token \
#     -v "$PWD/secrets:/run/secrets:ro" squirro-proxy
#
# Configuration comes from the environment only (see config/squirro-proxy.env.example). Inside a
# container the proxy listens on 0.0.0.0 to be reachable, which it refuses without a client token:
# mount one as a file (SQUIRRO_PROXY_CLIENT_TOKEN_FILE) and give it to the applications that call.

# --- build: the package and its dependencies in a virtual environment ---------------------------
FROM python:3.11.7-slim-bookworm AS build
ARG VENV=/opt/squirro-proxy
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# The environment gets no pip of its own: the image's pip installs into it from outside, so the
# final image receives the installed package and nothing to build or install with. The `speed`
# extra adds uvloop.
RUN python -m venv --without-pip "$VENV" \
 && python -m pip --python "$VENV/bin/python" install ".[speed]"

# --- runtime: the virtual environment, a non-root user, nothing else ----------------------------
FROM python:3.11.7-slim-bookworm
ARG VENV=/opt/squirro-proxy
LABEL org.opencontainers.image.title="squirro-proxy" \
      org.opencontainers.image.description="Local authenticating reverse proxy for the Squirro API"
COPY --from=build $VENV $VENV
# The base image's own pip and setuptools go too; the account has no shell and no home.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 squirro \
 && useradd --system --uid 10001 --gid squirro --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin squirro
ENV PATH="$VENV/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SQUIRRO_PROXY_HOST=0.0.0.0 \
    SQUIRRO_PROXY_PORT=8080 \
    SQUIRRO_PROXY_LOG_FORMAT=json
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# Slim images have no curl: Python asks /-/healthy, which answers any Host without a client token.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/-/healthy' % os.environ.get('SQUIRRO_PROXY_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["squirro-proxy"]
