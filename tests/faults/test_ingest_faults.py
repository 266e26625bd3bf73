"""Ingest under beanstalkd faults: down at start, hung, a smaller job limit, a damaged spool.

Like test_outages.py, these drive real processes (or the real enqueue task) against a
real beanstalkd and count what was acknowledged against what was stored. A hung
beanstalkd is a real one stopped with SIGSTOP: the kernel still completes TCP
handshakes on its listening socket, and nothing answers. The figures are printed with
``pytest -s``.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ingest import bsproto, enqueue
from ingest.enqueue import Enqueuer, Outcome
from ingest.metrics import IngestMetrics
from ingest.spool import Spool
from loadtest.bench import histogram_quantile, scrape
from tests.faults.test_outages import metric, report, start_consumer
from tests.load import Load, Sent, audit_until_settled
from tests.procs import start_ingest
from tests.servers import Beanstalkd, take_recipients
from trackbuf import codec
from trackbuf.events import Event, new_event
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.faults

MakeSettings = Callable[..., Settings]

QUEUED, SPOOLED, LOST = Outcome.QUEUED, Outcome.SPOOLED, Outcome.LOST
TUBE = "trackbuf-events"


def log_events(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f"event={event} " in line + " "]


def wait_for_log(path: Path, event: str, count: int = 1, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = log_events(path.read_text(), event)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_beanstalkd_down_at_start_is_logged_once_per_outage_with_its_error(
    make_settings: MakeSettings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    """Down from the start, ingest says so at once (not when the first event spools),
    with the error, and only once however often it retries."""
    settings = make_settings()
    log = tmp_path / "ingest.log"
    beanstalkd.stop()
    ingest = start_ingest(settings, log)
    time.sleep(2.0)  # several reconnect attempts
    first = log_events(log.read_text(), "beanstalkd_down")
    assert len(first) == 1, first
    assert "Connect call failed" in first[0] or "refused" in first[0].lower(), first[0]
    beanstalkd.start()
    assert wait_for_log(log, "beanstalkd_connected"), "never reconnected"
    beanstalkd.stop()  # a second outage, while idle: noticed and logged once more
    down = wait_for_log(log, "beanstalkd_down", count=2)
    time.sleep(1.5)
    down = log_events(log.read_text(), "beanstalkd_down")
    report("beanstalkd down at start", f"down_lines={len(down)}", "")
    assert len(down) == 2, down
    assert all("error=" in line for line in down), down
    assert ingest.terminate() == 0


DURATION = "trackbuf_ingest_request_duration_seconds"


def answered(before: dict[str, float], after: dict[str, float], le: str = "+Inf") -> float:
    """Requests (both routes) answered between two scrapes in at most ``le`` seconds."""
    total = 0.0
    for route in ("open", "click"):
        key = f'{DURATION}_bucket{{le="{le}",route="{route}"}}'
        total += after[key] - before[key]
    return total


def test_a_hung_beanstalkd_does_not_slow_ingest_down(
    make_settings: MakeSettings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    """beanstalkd stopped (SIGSTOP: connections open, nothing answered) for 4 s under
    steady load. Requests are answered from the spool at spool latency; only those in
    the one put in flight when it hung wait for that put to time out. Reconnecting is
    probed in the background. Every acknowledged event is stored once."""
    settings = make_settings(threads=2)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    concurrency = 16
    load = Load(f"http://{settings.listen}", keyring, "hang", count=3000, rate=300,
                concurrency=concurrency).start()  # fmt: skip
    time.sleep(2.0)
    assert beanstalkd.proc is not None
    before = scrape(settings.admin_listen)
    beanstalkd.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(4.0)
        during = scrape(settings.admin_listen)
    finally:
        beanstalkd.proc.send_signal(signal.SIGCONT)
    result = load.wait()
    audit = audit_until_settled(settings.database_url, "hang", result.acked)
    spooled = metric(settings, 'trackbuf_ingest_events_total{kind="open",outcome="spooled"}')
    # A request that waited longer than the stall bound plus a slow spool write was
    # waiting on the put that was in flight when beanstalkd stopped; doubled, so a
    # machine twice as slow (or with a core busy) still meets it. Waiting out the hang
    # itself would take the whole 4 s.
    assert 2 * (enqueue.PUT_STALL_S + 0.25) <= 1.0, "the bucket below no longer bounds it"
    in_hang = answered(before, during)
    slow = in_hang - answered(before, during, "1.0")  # the label as Prometheus writes it
    p99 = histogram_quantile(0.99, before, during, DURATION)
    report(
        "beanstalkd hung (SIGSTOP 4 s)",
        f"sent={result.sent} failed={result.failed} spooled_opens={spooled} "
        f"answered_in_hang={in_hang:.0f} slower_than_1s={slow:.0f} p99_in_hang={p99:.3f}s "
        f"p99_overall={result.p99():.3f}s",
        audit,
    )
    assert result.failed == 0 and audit.acked == 3000
    assert audit.lost == 0 and audit.duplicated == 0
    assert spooled > 0, "nothing went to the spool: the hang was not exercised"
    assert in_hang > 600, "ingest answered too few requests while beanstalkd hung"
    # At most one put was in flight, and it cannot hold more than the client's
    # concurrency; everyone else was answered within the bound. (A p99 is no verdict
    # here: the requests of that one put are by design more than 1% of the hang's
    # answers whenever fewer than 100 per waiting request come in, as on a busy
    # machine, where the put also held more of them; it is printed above.)
    assert slow <= concurrency, f"{slow:.0f} requests waited for the hung beanstalkd"
    assert consumer.terminate() == 0 and ingest.terminate() == 0


def spooled_job_sizes(directory: Path) -> list[int]:
    """Body sizes of the records in a spool directory (read, not claimed: flock is
    advisory, and the file only grows while we read it)."""
    sizes = []
    for path in sorted(directory.glob("*.spool")):
        data = path.read_bytes()
        offset = 0
        while offset + 8 <= len(data):
            (length,) = struct.unpack_from(">I", data, offset)
            if length == 0 or offset + 8 + length > len(data):
                break
            sizes.append(length)
            offset += 8 + length
    return sizes


def test_reconnecting_to_a_hung_server_backs_off(
    beanstalkd: Beanstalkd, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A beanstalkd stopped with SIGSTOP accepts connections (the kernel does) and never
    answers, like a hung host or a blackholing firewall: attempts are spaced 0.5, 1, 2,
    4 s apart after their timeouts, not every 0.5 s, and the outage is logged once.
    After SIGCONT the link connects again by itself."""
    monkeypatch.setattr(bsproto, "IO_TIMEOUT_S", 0.1)  # so attempts are quick to count
    window = 6.0
    attempts: list[float] = []
    real_open = bsproto.Connection.open

    async def timed_open(address: tuple[str, int], tube: str) -> bsproto.Connection:
        attempts.append(time.monotonic())  # observed only: the real connect runs
        return await real_open(address, tube)

    monkeypatch.setattr(bsproto.Connection, "open", staticmethod(timed_open))
    assert beanstalkd.proc is not None
    proc = beanstalkd.proc

    async def scenario() -> bool:
        link = bsproto.Link(("127.0.0.1", beanstalkd.port), TUBE, lambda up: None)
        proc.send_signal(signal.SIGSTOP)
        try:
            await link.start(wait=0)
            await asyncio.sleep(window)
        finally:
            proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + bsproto.RECONNECT_MAX_S + 2
        while link.conn is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        reconnected = link.conn is not None
        await link.close()
        return reconnected

    reconnected = asyncio.run(scenario())
    in_window = [at for at in attempts if at - attempts[0] < window]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(in_window)]
    down = [r for r in caplog.records if "event=beanstalkd_down" in r.getMessage()]
    report("reconnect to a hung server", f"attempts={len(in_window)} gaps={gaps}", "")
    # Every 0.5 s would be about 10 attempts in the window; with backoff: 0, 0.6, 1.7, 3.8.
    assert 3 <= len(in_window) <= 5, gaps
    assert all(b > a for a, b in itertools.pairwise(gaps)), gaps
    assert len(down) == 1 and "no answer" in down[0].getMessage()
    assert reconnected, "never reconnected after SIGCONT"


def test_spooled_jobs_are_split_for_a_server_with_a_smaller_job_limit(
    make_settings: MakeSettings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> None:
    """Events spooled in default-sized jobs (beanstalkd down) meet a beanstalkd that
    comes back with -z 1500: replay splits every record that no longer fits, and
    every acknowledged event is stored once."""
    settings = make_settings(threads=2)
    beanstalkd.stop()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    result = Load(f"http://{settings.listen}", keyring, "split", count=1500, rate=100_000,
                  concurrency=64).start().wait()  # fmt: skip
    records = metric(settings, "trackbuf_ingest_spool_jobs")
    sizes = spooled_job_sizes(Path(settings.spool_path))
    big = sum(1 for size in sizes if size > 1500)
    assert result.failed == 0 and len(result.acked) == 1500
    assert len(sizes) == records and big > 0, "no spooled job is too big for -z 1500"
    beanstalkd.extra = ("-z", "1500")
    beanstalkd.start()  # same port and binlog, smaller job limit
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    audit = audit_until_settled(settings.database_url, "split", result.acked)
    replayed = metric(settings, "trackbuf_ingest_spool_replayed_jobs_total")
    lost = metric(settings, 'trackbuf_ingest_events_total{kind="open",outcome="lost"}')
    lost += metric(settings, 'trackbuf_ingest_events_total{kind="click",outcome="lost"}')
    jobs = beanstalkd.tube_stats()["total-jobs"]
    report(
        "spool replayed into -z 1500",
        f"sent={result.sent} spooled_jobs={records:.0f} over_1500_bytes={big} "
        f"largest={max(sizes)} replayed={replayed:.0f} jobs_put={jobs} lost_metric={lost:.0f}",
        audit,
    )
    assert audit.acked == 1500 and audit.lost == 0 and audit.duplicated == 0
    assert lost == 0 and replayed == records
    assert jobs >= records + big, "the spooled jobs were not split"
    assert "max_job_bytes=1500" in ingest.log()
    assert consumer.terminate() == 0 and ingest.terminate() == 0


def test_a_corrupt_spool_record_is_counted_lost_and_the_rest_stored(
    make_settings: MakeSettings, beanstalkd: Beanstalkd, tmp_path: Path
) -> None:
    """A dead ingest left a spool of five 10-event jobs and the disk corrupted the
    third: the next ingest skips that one record, counts its 10 events as lost, and
    replays the two records after it instead of dropping them silently."""
    settings = make_settings(threads=2)
    events = [[new_event("open", "corrupt", f"j{j}-{i}") for i in range(10)] for j in range(5)]
    bodies = [codec.encode_job([codec.encode_event(e) for e in job]) for job in events]
    left_behind = Spool(Path(settings.spool_path), max_bytes=1 << 20)
    left_behind.open()
    assert all(left_behind.append(body) for body in bodies)
    path = left_behind._active_path
    left_behind.close()  # what a kill -9 leaves: the file, unlocked
    assert path is not None
    third = sum(8 + len(body) for body in bodies[:2]) + 8 + len(bodies[2]) // 2
    data = bytearray(path.read_bytes())
    data[third] ^= 0xFF  # one flipped byte inside the third job's events
    path.write_bytes(bytes(data))

    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = start_consumer(settings, tmp_path / "consumer.log")
    kept = {Sent("open", "corrupt", e.recipient) for job in events[:2] + events[3:] for e in job}
    audit = audit_until_settled(settings.database_url, "corrupt", kept)
    lost = metric(settings, 'trackbuf_ingest_events_total{kind="open",outcome="lost"}')
    report("corrupt spool record", f"records=5 corrupt=1 lost_metric={lost:.0f}", audit)
    assert audit.lost == 0 and audit.stored == 40 and audit.duplicated == 0
    assert lost == 10
    assert "event=spool_record_corrupt" in ingest.log()
    assert not list(Path(settings.spool_path).iterdir())  # replayed and deleted
    assert consumer.terminate() == 0 and ingest.terminate() == 0


# The enqueue task in this process, against a real beanstalkd ---------------------------


def enqueuer(server: Beanstalkd, tmp_path: Path, registry: CollectorRegistry) -> Enqueuer:
    return Enqueuer(
        [("127.0.0.1", server.port)],
        TUBE,
        ttr=60,
        max_job_bytes=60000,
        metrics=IngestMetrics.create(registry),
        spool=Spool(tmp_path / "spool", max_bytes=1 << 20),
    )


def batch_with_one_oversized_event() -> list[Event]:
    """Five events that fit one default-sized job; the middle one (a click with a
    1,600-byte URL) is bigger than a 1,500-byte max-job-size on its own."""
    events = [new_event("open", "big", f"r{i}") for i in range(5)]
    events[2] = new_event("click", "big", "r2", url="https://shop.example/" + "x" * 1600)
    return events


async def wait_connected(enq: Enqueuer, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not enq.connected:
        assert time.monotonic() < deadline, "never connected to beanstalkd"
        await asyncio.sleep(0.02)


async def submit_together(enq: Enqueuer, events: list[Event]) -> list[Outcome]:
    # Submitted before the enqueue task runs again, so they travel as one batch.
    futures = [enq.submit(codec.encode_event(event)) for event in events]
    return [await future for future in futures]


def run_then_take(
    scenario: Callable[[], Coroutine[Any, Any, list[Outcome]]], server: Beanstalkd
) -> tuple[list[Outcome], list[str]]:
    """Run an enqueue scenario, then take what it left in beanstalkd; the server is
    killed whatever happens."""
    try:
        outcomes = asyncio.run(scenario())
        return outcomes, take_recipients(server)
    finally:
        server.kill()


def lost(registry: CollectorRegistry, kind: str) -> float:
    value = registry.get_sample_value(
        "trackbuf_ingest_events_total", {"kind": kind, "outcome": "lost"}
    )
    return value or 0.0


def test_an_oversized_event_in_a_split_job_is_lost_alone(tmp_path: Path) -> None:
    """JOB_TOO_BIG splits the job; the one event too big for any job is lost (and its
    request told so), the others are queued and their requests told so."""
    server = Beanstalkd(tmp_path / "binlog", "-z", "1500").start()
    registry = CollectorRegistry()

    async def scenario() -> list[Outcome]:
        enq = enqueuer(server, tmp_path, registry)
        await enq.start()
        await wait_connected(enq)
        # Ingest learns max-job-size when it connects, so only a batch packed before
        # that (a race with a reconnect) meets a smaller limit; pack as if it had.
        enq._lanes[0].putter.job_bytes = 60000
        outcomes = await submit_together(enq, batch_with_one_oversized_event())
        assert await enq.close(5)
        return outcomes

    outcomes, stored = run_then_take(scenario, server)
    report("oversized event, live", f"outcomes={[o.value for o in outcomes]}", stored)
    assert outcomes == [QUEUED, QUEUED, LOST, QUEUED, QUEUED]
    assert stored == ["r0", "r1", "r3", "r4"]


def test_replay_drops_only_the_oversized_event_of_a_spooled_job(tmp_path: Path) -> None:
    """A job spooled under the default limit meets a server started with -z 1500:
    replay splits it, puts every event that fits and drops (counts) only the one that
    cannot fit in any job."""
    server = Beanstalkd(tmp_path / "binlog", "-z", "1500")  # not started: down
    registry = CollectorRegistry()

    async def scenario() -> list[Outcome]:
        enq = enqueuer(server, tmp_path, registry)
        await enq.start()
        outcomes = await submit_together(enq, batch_with_one_oversized_event())
        assert enq.spool is not None and enq.spool.pending_records == 1
        server.start()
        deadline = time.monotonic() + 15
        while not enq.spool.empty:
            assert time.monotonic() < deadline, "the spool was never replayed"
            await asyncio.sleep(0.05)
        assert await enq.close(5)
        return outcomes

    outcomes, stored = run_then_take(scenario, server)
    report("oversized event, replay", f"outcomes={[o.value for o in outcomes]}", stored)
    assert outcomes == [SPOOLED] * 5
    assert stored == ["r0", "r1", "r3", "r4"]
    assert lost(registry, "click") == 1 and lost(registry, "open") == 0


def test_stopping_does_not_wait_for_a_hung_replay(
    beanstalkd: Beanstalkd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests never wait for a replay round, so neither does a stop: the round is
    cancelled, the stop is clean, and the record stays in the spool for next time.

    To hang a replay's put on a real beanstalkd, the connection must be up (replay runs
    only then) and the put unanswered: in drain mode (SIGUSR1) beanstalkd answers
    ``use`` and ``stats`` but refuses puts, so the first replay pauses with the record
    kept and the connection up; SIGSTOP then hangs the next replay's put."""
    spool_dir = tmp_path / "spool"
    left_behind = Spool(spool_dir, max_bytes=1 << 20)
    left_behind.open()
    assert left_behind.append(codec.encode_job([codec.encode_event(new_event("open", "c", "r"))]))
    left_behind.close()
    registry = CollectorRegistry()
    assert beanstalkd.proc is not None
    proc = beanstalkd.proc
    proc.send_signal(signal.SIGUSR1)  # drain mode: every put answers DRAINING

    async def wait_log(event: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not any(f"event={event}" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, f"no {event}"
            await asyncio.sleep(0.01)

    async def scenario() -> tuple[bool, float]:
        enq = enqueuer(beanstalkd, tmp_path, registry)
        await enq.start()
        await wait_log("spool_replay_paused")  # the first replay put: DRAINING
        proc.send_signal(signal.SIGSTOP)
        try:
            await wait_log("beanstalkd_stalled")  # the next replay put hangs
            started = time.monotonic()
            finished = await enq.close(timeout=5.0)
            return finished, time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGCONT)

    finished, took = asyncio.run(scenario())
    report("stop during a hung replay", f"clean={finished} took={took:.2f}s", "")
    # Waiting for the hung put would take the whole 5 s; a tenth of it leaves a slow
    # machine room for the cancelled round's stall bound (0.25 s).
    assert finished and took < 2.5
    # Resumed, beanstalkd reads what the closed connection had sent: the command that
    # hung was the second put (a replay's), not a ping.
    deadline = time.monotonic() + 5
    while beanstalkd.stats()["cmd-put"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert beanstalkd.stats()["cmd-put"] == 2
    after = Spool(spool_dir, max_bytes=1 << 20)
    after.open()
    assert after.pending_records == 1  # replayed by the next start
    after.close()
