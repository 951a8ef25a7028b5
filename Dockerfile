# syntax=docker/dockerfile:1
# webhook-ingest: one image for every role. The command picks it (see docker-compose.yml):
#   ingest serve | ingest worker --queue NAME | ingest migrate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# 1. Dependencies only, from the lock (exact versions and their hashes; `bash .ci/lock` makes it
#    from pyproject.toml's ranges): this layer is rebuilt when the lock changes, not on every
#    code change. Every dependency ships wheels: no compiler needed.
COPY requirements/runtime.txt /tmp/requirements.txt
RUN pip install --require-hashes -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The application itself: its dependencies are already in place, and it is built with the
#    setuptools the lock pinned (no build isolation: nothing is fetched outside the lock).
COPY pyproject.toml README.md ./
COPY ingest ./ingest
COPY workers ./workers
COPY sinks ./sinks
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf /src

# 3. Plugins: what deploy/plugins/requirements.txt names, from that folder (nothing as shipped;
#    docs/sinks.md, "Installing a plugin"). After the application, so a plugin's own
#    dependencies resolve against it.
COPY deploy/plugins /plugins
RUN cd /plugins && pip install -r requirements.txt && rm -rf /plugins
WORKDIR /app

# 4. Run as an unprivileged user. The spool (deliveries journaled while Redis is away) is the
#    only place the service writes; docker-compose mounts a volume there.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ingest \
 && mkdir -p /var/lib/ingest/spool \
 && chown -R ingest:ingest /var/lib/ingest
USER ingest
ENV INGEST_SPOOL_DIR=/var/lib/ingest/spool

# 8000: the acceptor (ingest serve). 9100: a worker's Prometheus metrics (INGEST_METRICS_PORT).
EXPOSE 8000 9100
ENTRYPOINT ["ingest"]
CMD ["serve"]
