"""``trackbuf consume``: N worker threads, metrics and health, graceful stop."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry

from consumer import classify
from consumer.health import Health, serve
from consumer.metrics import ConsumerMetrics
from consumer.queue_metrics import QueueCollector
from consumer.turns import Turns
from consumer.worker import Worker
from store.forget import expire_loop
from store.partitions import ensure_loop
from trackbuf.log import kv
from trackbuf.settings import Settings, parse_hostport

log = logging.getLogger("trackbuf.consumer")


def run(
    settings: Settings,
    stop: threading.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or, with ``burst``, until the queue is empty).

    On a stop request each worker finishes (or releases) its current batch; a worker
    that does not finish within ``shutdown_timeout`` is abandoned, and the process
    exit then closes its connections, which hands its jobs back to beanstalkd.
    """
    settings.require_database()
    # Before the seconds spent reading the classification lists: a stop asked for
    # while they load is a clean stop (exit 0), not a death by signal.
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    classify.configure(settings.apple_egress_csv)
    try:
        classify.classifier()  # the rules and the source snapshots, read once, here
    except (OSError, ValueError) as exc:
        log.error(kv("classification_rules_unreadable", error=str(exc)))
        print(f"trackbuf consume: cannot read the classification rules: {exc}", file=sys.stderr)
        return 2
    if stop.is_set():
        log.info(kv("consumer_stopped", jobs=0, crashed=False))
        return 0
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ConsumerMetrics.create(registry)
    QueueCollector(settings.beanstalkd_addresses, settings.tube).register(registry)
    health = Health(metrics)
    server = serve(parse_hostport(settings.metrics_listen, "metrics_listen"), registry, health)
    turns = Turns()  # one collecting thread at a time per server (consumer/turns.py)
    workers = [Worker(i, settings, metrics, health, stop, turns) for i in range(settings.threads)]
    threads = [
        threading.Thread(target=w.run, name=f"consumer-{w.index}", daemon=True) for w in workers
    ]
    for thread in threads:
        thread.start()
    # Off the insert path: deletes `trackbuf forget` tombstones past their keep date.
    expiry_stop = threading.Event()
    expiry = threading.Thread(
        target=expire_loop, args=(settings.database_url, expiry_stop), name="tombstone-expiry",
        daemon=True,
    )  # fmt: skip
    expiry.start()
    # Also off the insert path: the coming months' partitions of events, at start and
    # hourly (an event no partition covers still lands in the DEFAULT one).
    partitions = threading.Thread(
        target=ensure_loop, args=(settings.database_url, expiry_stop), name="event-partitions",
        daemon=True,
    )  # fmt: skip
    partitions.start()
    log.info(kv("consumer_started", threads=settings.threads, burst=settings.burst))
    crashed = False
    while any(t.is_alive() for t in threads) and not stop.is_set():
        stop.wait(0.2)
        if not settings.burst and not all(t.is_alive() for t in threads):
            # A worker died of a bug: stop cleanly and let the supervisor restart us
            # rather than limp on with fewer threads than configured.
            crashed = True
            stop.set()
    deadline = time.monotonic() + settings.shutdown_timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    expiry_stop.set()
    expiry.join(max(deadline - time.monotonic(), 0))
    partitions.join(max(deadline - time.monotonic(), 0))
    server.shutdown()
    server.server_close()
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        log.error(kv("consumer_stop_timeout", stuck=",".join(stuck)))
        return 1
    # In burst mode a worker that died of a bug ends like one that drained: only its
    # flag tells them apart, and jobs it left behind must not end in exit 0.
    crashed = crashed or any(w.state.crashed for w in workers)
    jobs = sum(w.state.jobs_done for w in workers)
    log.info(kv("consumer_stopped", jobs=jobs, crashed=crashed))
    return 1 if crashed else 0
