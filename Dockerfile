# Two images from one file:
#   --target app         trackbuf (ingest, consume, migrate, status, ...)
#   --target beanstalkd  Debian's beanstalkd, binlog on
FROM python:3.11-slim AS app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY trackbuf ./trackbuf
COPY ingest ./ingest
COPY consumer ./consumer
COPY store ./store
COPY commands ./commands
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/trackbuf trackbuf \
    && mkdir -p /var/lib/trackbuf && chown trackbuf /var/lib/trackbuf
USER trackbuf
ENV TRACKBUF_DATA_DIR=/var/lib/trackbuf
ENTRYPOINT ["trackbuf"]

FROM debian:12-slim AS beanstalkd
RUN apt-get update && apt-get install -y --no-install-recommends beanstalkd \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/beanstalkd
VOLUME /var/lib/beanstalkd
EXPOSE 11300
# -b: every acknowledged put is in the binlog before the answer; -f 0: fsync before
# answering, so a power loss loses nothing either (see docs/RELIABILITY.md).
ENTRYPOINT ["beanstalkd", "-l", "0.0.0.0", "-p", "11300", "-b", "/var/lib/beanstalkd"]
CMD ["-f", "0"]
