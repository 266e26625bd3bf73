"""Smoke runs of the load generator and the benchmark runner: seconds, tiny counts.

The full benchmark is a documented command (BENCHMARKS.md), never a timed test; this
checks the machinery: loss accounting, the JSON, the charts, the Markdown tables.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from loadtest.traffic import drive
from tests.procs import Process, start_ingest
from trackbuf.settings import Settings
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_generator_records_every_acknowledged_request(
    make_settings, keyring: Keyring, tmp_path: Path
) -> None:
    settings: Settings = make_settings()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    try:
        result = asyncio.run(
            drive(f"http://{settings.listen}", keyring, "smoke", profile="spike", rate=100,
                  duration_s=2, max_requests=300)
        )  # fmt: skip
        # The generator's campaigns vary, so audit by recipient across all of them.
        stored = asyncio.run(recipients(settings.database_url, set(result.acked)))
    finally:
        consumer.terminate()
        ingest.terminate()
    assert result.failed == 0 and result.sent == len(result.acked) > 100
    assert result.sent <= 300
    assert set(result.acked) <= stored
    assert max(result.per_second.values()) > min(result.per_second.values())  # the spike


async def recipients(dsn: str, expected: set[str]) -> set[str]:
    """Stored recipients, once all expected ones arrived (or after 20 s)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            stored = {row["recipient"] for row in await conn.fetch("SELECT recipient FROM events")}
            if expected <= stored:
                break
            await asyncio.sleep(0.1)
        return stored
    finally:
        await conn.close()


def test_benchmark_runner_writes_json_charts_and_tables(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(
        "# Benchmarks\n\nProse kept.\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "bench", "--quick", "--only",
         "ingest,workers,flood,fsync,drain,memory,spike,report,scaling",
         "--out", str(tmp_path), "--markdown", str(markdown)],
        capture_output=True, text=True, cwd=ROOT, timeout=420,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    ingest = results["ingest"]
    assert all(ingest[name]["requests_per_s"] > 0 for name in ("nginx_empty_gif",
               "aiohttp_bare", "aiohttp_bare_lowlevel", "naive_insert_per_request",
               "trackbuf_ingest"))  # fmt: skip
    assert ingest["database_outage"]["trackbuf_ingest"]["errors"] == 0
    assert results["workers"]["metrics_match"] is True
    assert results["workers"]["requests_per_s"]["2"] > 0
    flood = results["flood"]
    assert all(flood[kind]["requests_per_s"] > 0 for kind in ("valid_open", "forged_open",
               "forged_click", "garbage"))  # fmt: skip
    assert flood["valid_open"]["beanstalkd_puts"] > 0  # the measure is live...
    assert flood["forged_open"]["beanstalkd_puts"] == 0  # ...and invalid tokens put nothing
    assert flood["forged_click"]["beanstalkd_puts"] == flood["garbage"]["beanstalkd_puts"] == 0
    assert flood["forged_click"]["non_2xx_3xx"] > 0  # 404 pages, not redirects
    assert all(r["requests_per_s"] > 0 and r["events_per_job"] >= 1
               and r["drain_one_event_jobs_per_s"] > 0
               for r in results["fsync"].values())  # fmt: skip
    assert all(rates["1"] > 0 for rates in results["drain"]["consumer_events_per_s"].values())
    assert set(results["drain"]["consumer_events_per_s"]) == {"-f 0", "-f 50"}
    assert len(results["memory"]["rss_mb"]) == 2 and min(results["memory"]["rss_mb"]) > 0
    assert results["drain"]["ceilings_rows_per_s"]["copy_staging_on_conflict"] > 0
    assert results["spike"]["lost"] == 0
    assert results["spike"]["client"]["acknowledged"] == results["spike"]["stored"]
    for chart in ("ingest.png", "drain.png", "spike.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert "Prose kept." in text and "old" not in text
    assert "### Drain" in text and "**lost 0**" in text
    assert "### Ingest (" in text and "### Ingest processes" in text
    assert "### beanstalkd fsync setting" in text and "### Consumer memory" in text
    assert "### Invalid-token flood" in text
    report = results["report"]
    assert report["rollup_rows"] > 0 and report["events"] == 20_000
    assert all(t["median_ms"] > 0 for t in report["report_ms"].values())
    assert "### Report time" in text
    scaling = results["scaling"]
    assert set(scaling["drain"]) == set(scaling["ingest"]) == {
        f"{s} beanstalkd, {n} process(es)" for s in (1, 3) for n in (1, 2)
    }  # fmt: skip
    assert all(r["requests_per_s"] > 0 and r["errors"] == 0 and r["beanstalkd_cpu_us"] > 0
               for r in scaling["ingest"].values())  # fmt: skip
    # Every drain stored exactly its events (the section checks), and each part worked.
    assert all(r["events_per_s"] > 0 and r["consumer_cpu_us"] > 0 and r["postgres_cpu_us"] > 0
               for r in scaling["drain"].values())  # fmt: skip
    assert "### Scaling" in text


def test_cost_section_counts_every_process_per_stored_event(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "bench", "--quick", "--only", "cost",
         "--out", str(tmp_path), "--markdown", str(markdown)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cost = json.loads((tmp_path / "results.json").read_text())["cost"]
    trackbuf, naive = cost["trackbuf"], cost["naive_insert_per_request"]
    before = cost["trackbuf_before"]  # no fast path, no job linger: the earlier design
    for mine in (trackbuf, before):
        assert set(mine["cpu_s"]) == {"ingest", "beanstalkd", "consumer",
                                      "postgresql_backends", "postgresql_background"}  # fmt: skip
        # Every event ingest acknowledged is stored, and nothing else is.
        assert mine["stored"] == mine["acknowledged"]
        assert mine["events_per_job"] >= 1
    assert set(naive["cpu_s"]) == {"naive_tracker", "postgresql_backends",
                                   "postgresql_background"}  # fmt: skip
    for result in (trackbuf, before, naive):
        assert all(v > 0 for v in result["cpu_s_per_million"].values()), result["cpu_s"]
        assert result["stored"] > 500
        parts = sum(result["cpu_s_per_million"].values())
        assert abs(parts - result["total_cpu_s_per_million"]) < 1
        assert result["cores_at_10k_per_s"] == pytest.approx(
            result["total_cpu_s_per_million"] / 100, abs=0.01
        )
    assert trackbuf["client"]["requests"] <= trackbuf["acknowledged"]
    # The naive tracker answers after its INSERT: at most a request per connection
    # was still in flight (stored, not yet counted by wrk) when wrk stopped: 40 here.
    assert 0 <= naive["stored"] - naive["acknowledged"] <= 100
    assert trackbuf["client"]["non_2xx_3xx"] == naive["client"]["non_2xx_3xx"] == 0
    text = markdown.read_text()
    assert "### CPU per million stored events" in text and "trackbuf before" in text
    assert cost["after_vs_before_total"] == pytest.approx(
        trackbuf["total_cpu_s_per_million"] / before["total_cpu_s_per_million"], abs=0.01
    )
    # The wrk run and the smooth one, each against a bare handler under the same driver.
    smooth = cost["smooth"]
    for run, bare in ((trackbuf, cost["bare"]), (smooth["trackbuf"], smooth["bare"])):
        assert run["stored"] == run["acknowledged"] > 500
        assert run["jobs"] >= 1 and run["reserve_commands"] >= run["jobs"]
        assert run["reserves_per_job"] == pytest.approx(
            run["reserve_commands"] / run["jobs"], abs=0.01
        )
        assert bare["client"]["requests"] > 500 and bare["cpu_us_per_request"] > 0
    client = smooth["trackbuf"]["client"]
    assert client["errors"] == client["non_2xx_3xx"] == 0
    assert client["answered"] == client["scheduled"]
    assert "under smooth traffic" in text and "bare aiohttp pixel handler" in text


def test_idle_section_measures_an_idle_consumer(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "bench", "--quick", "--only", "idle",
         "--out", str(tmp_path), "--markdown", str(markdown)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    idle = json.loads((tmp_path / "results.json").read_text())["idle"]
    for name, servers in (("one_server_4_threads", 1), ("pool_of_3_1_thread", 3)):
        run = idle[name]
        assert run["servers"] == servers
        # Waiting costs one reserve a second per connection (4 and 3 here); polling
        # sent tens. Generous: counted over 2 s on a shared machine.
        assert 0 < run["reserves_per_s"] <= 4 * 2
        assert 0 <= run["consumer_core_share"] < 0.1
    assert "### An idle consumer" in markdown.read_text()
