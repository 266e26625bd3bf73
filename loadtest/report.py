"""Benchmark results as JSON, PNG charts and the tables in BENCHMARKS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; files only
import matplotlib.pyplot as plt

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def charts(results: dict[str, Any], out: Path) -> list[Path]:
    made = []
    if "ingest" in results:
        ingest = results["ingest"]
        names = ["nginx_empty_gif", "aiohttp_bare", "trackbuf_ingest", "naive_insert_per_request"]
        values = [ingest[n]["requests_per_s"] for n in names]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(
            [n.replace("_", "\n") for n in names], values, color=["#999", "#69c", "#2a7", "#c55"]
        )
        ax.set_ylabel("requests/s (wrk, 64 connections)")
        ax.set_title("Pixel requests per second, same machine, same run")
        made.append(_save(fig, out / "ingest.png"))
    if "drain" in results:
        drain = results["drain"]
        labels = ["raw COPY", "COPY+staging\n+ON CONFLICT"]
        values = list(drain["ceilings_rows_per_s"].values())
        colors = ["#999", "#999"]
        for mode, color in zip(drain["consumer_events_per_s"], ("#2a7", "#69c"), strict=False):
            for threads, rate in drain["consumer_events_per_s"][mode].items():
                labels.append(f"{threads} thr\n{mode}")
                values.append(rate)
                colors.append(color)
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar(labels, values, color=colors)
        ax.set_ylabel("events/s into PostgreSQL")
        ax.set_title("Drain rate against COPY ceilings")
        made.append(_save(fig, out / "drain.png"))
    if "spike" in results:
        made.append(_spike_chart(results["spike"], out / "spike.png"))
    return made


def _spike_chart(spike: dict[str, Any], path: Path) -> Path:
    per_second = {int(k): v for k, v in spike["per_second"].items()}
    p99 = {int(k): v for k, v in spike["p99_per_second_ms"].items()}
    down, up = spike["database_down_s"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    # The last second is partial (the run ends inside it): leave it out.
    seconds = [s for s in sorted(per_second) if s < spike["duration_s"] - 1]
    axes[0].plot(seconds, [per_second[s] for s in seconds], color="#2a7")
    axes[0].set_ylabel("answered/s")
    axes[0].set_ylim(0, max(per_second.values(), default=1) * 1.3)
    axes[1].plot(seconds, [p99.get(s, 0.0) for s in seconds], color="#69c")
    axes[1].set_ylabel("p99 latency (ms)")
    axes[1].set_ylim(bottom=0)
    queue = spike["queue"]
    axes[2].plot([q["t"] for q in queue], [q["ready_jobs"] for q in queue], color="#c55")
    axes[2].set_ylabel("ready jobs in beanstalkd")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(down, up, color="#fdd", label="PostgreSQL stopped")
    axes[0].legend(loc="lower left")
    axes[0].set_title(
        f"Spike demo: lost {spike['lost']} of {spike['client']['acknowledged']} acknowledged"
    )
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cpu_lines(ing: dict[str, Any]) -> list[str]:
    """Requests per CPU-second: the throughput ratio without wrk's share of the cores."""
    if "trackbuf_vs_bare_cpu" not in ing["ratios"]:
        return []
    queue = ing["trackbuf_ingest"]["beanstalkd_cpu_us_per_request"]
    return [f"By server CPU per request (lowest of the rounds), trackbuf / bare aiohttp = "
            f"**{ing['ratios']['trackbuf_vs_bare_cpu']}**; beanstalkd adds {queue:.1f} us "
            f"per request on top of trackbuf's own.", ""]  # fmt: skip


FLOOD_LABELS = {
    "valid_open": "valid opens (stored)",
    "forged_open": "forged opens (bad signature; pixel served)",
    "forged_click": "forged clicks (bad signature; 404 page)",
    "garbage": "garbage tokens (no token shape; pixel served)",
}


def _flood_lines(flood: dict[str, Any]) -> list[str]:
    rounds = len(flood["valid_open"]["runs_rps"])
    lines = [f"### Invalid-token flood (wrk -t2 -c64 against one ingest, best of {rounds} "
             "interleaved round(s))", "",
             "| requests | requests/s | p99 ms | ingest CPU us/request | beanstalkd puts |",
             "|---|---|---|---|---|"]  # fmt: skip
    for kind, label in FLOOD_LABELS.items():
        r = flood[kind]
        lines.append(f"| {label} | {r['requests_per_s']:,.0f} | {r['p99_ms']:.2f} | "
                     f"{r['cpu_us_per_request']:.1f} | {r['beanstalkd_puts']:,} |")  # fmt: skip
    forged = flood["vs_valid"]["forged_open"]
    invalid_puts = sum(
        flood[kind]["beanstalkd_puts"] for kind in FLOOD_LABELS if kind != "valid_open"
    )
    lines += ["", f"Forged opens / valid opens: **{forged['requests_per_s']}x** the requests/s "
              f"at {forged['cpu_us_per_request']}x the CPU per request; puts into beanstalkd "
              f"during the invalid floods: **{invalid_puts}**.", ""]  # fmt: skip
    return lines


def _scaling_lines(sc: dict[str, Any]) -> list[str]:
    lines = [f"### Scaling (best of {sc['rounds']} interleaved round(s); ingest: wrk -t2 -c64; "
             f"drain: {sc['drain_events']:,} events spread over the pool, "
             f"{sc['consumer_threads_per_process']} threads per consumer process)", "",
             "| beanstalkd servers, processes | ingest requests/s | vs 1, 1 | "
             "CPU us/request ingest / beanstalkd | drain events/s | vs 1, 1 | "
             "CPU us/event consumer / beanstalkd / PostgreSQL |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, ing in sc["ingest"].items():
        dr = sc["drain"][key]
        lines.append(f"| {key} | {ing['requests_per_s']:,.0f} | {sc['ingest_vs_base'][key]} | "
                     f"{ing['ingest_cpu_us']} / {ing['beanstalkd_cpu_us']} | "
                     f"{dr['events_per_s']:,} | {sc['drain_vs_base'][key]} | "
                     f"{dr['consumer_cpu_us']} / {dr['beanstalkd_cpu_us']} / "
                     f"{dr['postgres_cpu_us']} |")  # fmt: skip
    return [*lines, ""]


COST_PARTS = {
    "ingest": "trackbuf ingest",
    "beanstalkd": "beanstalkd",
    "consumer": "trackbuf consumer",
    "naive_tracker": "naive tracker (aiohttp + asyncpg)",
    "postgresql_backends": "PostgreSQL backends",
    "postgresql_background": "PostgreSQL background",
}


def _cost_lines(c: dict[str, Any]) -> list[str]:
    """CPU seconds per million stored events, per process, both designs side by side
    (and trackbuf with every job put at once, where the run measured it)."""
    t, n = c["trackbuf"], c["naive_insert_per_request"]
    runs = [("trackbuf", t)]
    if "trackbuf_before" in c:
        runs.insert(0, ("trackbuf before", c["trackbuf_before"]))
    runs.append(("naive", n))
    lines = [f"### CPU per million stored events (wrk paced at {c['target_rate']:,.0f} "
             f"events/s for {c['duration_s']:.0f} s; opens, repeat opens and clicks)", "",
             "| process | " + " | ".join(f"{name} CPU s / million" for name, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]  # fmt: skip

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    for part, label in COST_PARTS.items():
        values = [r["cpu_s_per_million"].get(part) for _, r in runs]
        lines.append(row(label, ["-" if v is None else f"{v:,.1f}" for v in values]))
    lines += [
        row("**total**", [f"**{r['total_cpu_s_per_million']:,.1f}**" for _, r in runs]),
        row("cores busy at 10,000 events/s", [f"**{r['cores_at_10k_per_s']}**" for _, r in runs]),
        "",
    ]
    if "trackbuf_before" in c:
        b = c["trackbuf_before"]
        lines += ["\"trackbuf before\" is the design before the fast path and the job linger "
                  "(`TRACKBUF_FAST_PATH=0 TRACKBUF_JOB_LINGER_MS=0`: aiohttp answers every "
                  "request, every job is put at once), run in the same process tree: total "
                  f"CPU per stored event after / before = **{c['after_vs_before_total']}**. "
                  f"Events per job {t['events_per_job']} after, {b['events_per_job']} "
                  f"before; client p99 {t['client']['p99_ms']} ms after, "
                  f"{b['client']['p99_ms']} ms before (wrk's, pacing included).", ""]  # fmt: skip
    lines += [f"trackbuf: {t['client']['requests_per_s']:,.0f} requests/s answered, "
              f"{t['acknowledged']:,} events acknowledged, {t['stored']:,} stored. "
              f"Naive: {n['client']['requests_per_s']:,.0f} requests/s answered, "
              f"{n['stored']:,} stored. trackbuf / naive total CPU = "
              f"**{c['trackbuf_vs_naive_total']}** (the naive tracker writes bare rows; "
              "trackbuf's consumer also classifies them and keeps the rollups). "
              f"Load average before and after: {c['load_average_before'][0]}, "
              f"{c['load_average_after'][0]} (other work on the machine inflates CPU per "
              "event).", ""]  # fmt: skip
    if "bare" in c:
        lines += [f"Under wrk {_jobs_line(t)} A bare aiohttp pixel handler under the same "
                  f"wrk pacing: {c['bare']['cpu_us_per_request']} us of CPU per request; "
                  f"the whole pipeline per stored event / that = **{c['trackbuf_vs_bare']}x**.",
                  ""]  # fmt: skip
    if "smooth" in c:
        lines += _smooth_lines(c["smooth"])
    return lines


def _idle_lines(idle: dict[str, Any]) -> list[str]:
    lines = [f"### An idle consumer ({idle['seconds']:.0f} s, nothing queued)", "",
             "| consumer | its CPU, share of a core | beanstalkd's | reserve commands/s |",
             "|---|---|---|---|"]  # fmt: skip
    for r in idle.values():
        if isinstance(r, dict):
            lines.append(f"| {r['threads']} thread(s), {r['servers']} server(s) | "
                         f"**{r['consumer_core_share']:.2%}** | {r['beanstalkd_core_share']:.2%} | "
                         f"{r['reserves_per_s']} |")  # fmt: skip
    return [*lines, ""]


def _jobs_line(run: dict[str, Any]) -> str:
    return (f"jobs held {run['events_per_job']} events; {run['reserve_commands']:,} reserve "
            f"commands for {run['jobs']:,} jobs (beanstalkd's `stats`): "
            f"**{run['reserves_per_job']} per job**.")  # fmt: skip


def _smooth_lines(sm: dict[str, Any]) -> list[str]:
    """The pipeline against a bare handler under smooth traffic, part by part."""
    t, bare = sm["trackbuf"], sm["bare"]
    client = t["client"]
    rounds = sm.get("rounds", 1)
    lines = [f"### CPU per stored event under smooth traffic ({sm['target_rate']:,.0f} "
             f"events/s, Poisson arrivals over {sm['connections']} keep-alive connections, "
             f"{sm['duration_s']:.0f} s, best of {rounds} interleaved round(s))", "",
             "| part | CPU us per stored event | / bare handler |", "|---|---|---|"]  # fmt: skip
    base = max(bare["cpu_us_per_request"], 0.1)
    for part, label in COST_PARTS.items():
        value = t["cpu_s_per_million"].get(part)
        if value is not None:
            lines.append(f"| {label} | {value:,.1f} | {value / base:.2f}x |")
    total = t["total_cpu_s_per_million"]
    lines += [f"| **whole pipeline** | **{total:,.1f}** | **{sm['trackbuf_vs_bare']}x** |",
              f"| bare aiohttp pixel handler, same driver and rate, per request | "
              f"{bare['cpu_us_per_request']} | 1x |", "",
              f"Under this driver {_jobs_line(t)} {client['answered']:,} of "
              f"{client['scheduled']:,} scheduled "
              f"requests answered ({client['requests_per_s']:,.0f}/s, {client['late']:,} sent "
              f"late, {client['errors']} errors, {client['non_2xx_3xx']} not 2xx/3xx), p50 "
              f"{client['p50_ms']} ms and p99 {client['p99_ms']} ms from each request's "
              f"moment; {t['acknowledged']:,} events acknowledged, {t['stored']:,} stored.",
              ""]  # fmt: skip
    if "bare_us_per_request_rounds" in sm:
        lines += [f"Every round, in order: bare handler {sm['bare_us_per_request_rounds']} us "
                  f"per request, pipeline {sm['trackbuf_us_per_event_rounds']} us per stored "
                  "event.", ""]  # fmt: skip
    return lines


def tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "ingest" in results:
        ing = results["ingest"]
        rounds = len(ing["trackbuf_ingest"].get("runs_rps", [])) or 1
        lines += [f"### Ingest (wrk -t2 -c64, best of {rounds} interleaved round(s))", "",
                  "| server | requests/s | p50 ms | p99 ms | errors | server CPU us/request |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name in (
            "nginx_empty_gif",
            "aiohttp_bare",
            "aiohttp_bare_lowlevel",
            "naive_insert_per_request",
            "trackbuf_ingest",
        ):
            if name not in ing:
                continue  # results from before that baseline existed
            r = ing[name]
            cpu = f"{r['cpu_us_per_request']:.1f}" if "cpu_us_per_request" in r else "-"
            errors = r["errors"] + r["non_2xx_3xx"]
            lines.append(f"| {name} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {errors} | {cpu} |")  # fmt: skip
        ratios = ing["ratios"]
        paced = ing["trackbuf_at_70pct"]
        lowlevel = ratios.get("trackbuf_vs_bare_lowlevel")
        lines += ["", f"trackbuf / bare aiohttp = **{ratios['trackbuf_vs_bare']}**, "
                  f"trackbuf / naive = **{ratios['trackbuf_vs_naive']}**, "
                  f"trackbuf / nginx = {ratios['trackbuf_vs_nginx']}"
                  + (f", trackbuf / bare low-level aiohttp (the server ingest runs on) = "
                     f"{lowlevel}." if lowlevel else "."), "",
                  *_cpu_lines(ing),
                  f"Paced at 70% of its maximum ({paced['target_rate']:,} req/s asked of wrk "
                  f"paced per connection; it delivered {paced['requests_per_s']:,.0f}, "
                  f"{_share(paced, ing)} of the maximum): p50 "
                  f"{paced['p50_ms']} ms, p99 **{paced['p99_ms']} ms**.", ""]  # fmt: skip
        outage = ing["database_outage"]
        lines += ["Database stopped for the middle third of a wrk run:", "",
                  "| server | requests/s | failed requests |", "|---|---|---|"]  # fmt: skip
        for name, r in outage.items():
            lines.append(
                f"| {name} | {r['requests_per_s']:,.0f} | {r['errors'] + r['non_2xx_3xx']:,} |"
            )
        lines.append("")
    if "workers" in results:
        w = results["workers"]
        rps, cpu = w["requests_per_s"], w["cpu_us_per_request"]
        rounds = len(w["runs_rps"]["1"])
        lines += ["### Ingest processes (`--workers`, one shared socket; wrk -t2 -c64, best of "
                  f"{rounds} interleaved round(s))", "",
                  "| workers | requests/s | server CPU us/request | answered (wrk) | "
                  "counted (/metrics) |", "|---|---|---|---|---|"]  # fmt: skip
        for n in rps:
            lines.append(f"| {n} | {rps[n]:,} | {cpu[n]} | {w['answered_by_wrk'][n]:,} | "
                         f"{w['counted_by_metrics'][n]:,} |")  # fmt: skip
        lines += ["", f"2 workers / 1 worker = **{w['two_vs_one']}** on two cores shared with "
                  f"wrk, beanstalkd and PostgreSQL; /metrics counts every answer across "
                  f"processes: **{'yes' if w['metrics_match'] else 'NO'}**.", ""]  # fmt: skip
    if "flood" in results:
        lines += _flood_lines(results["flood"])
    if "fsync" in results:
        f = results["fsync"]
        lines += ["### beanstalkd fsync setting (binlog on)", "",
                  "Ingest: trackbuf ingest under wrk -t2 -c64. Drain: the consumer, 4 threads, "
                  "emptying jobs of one event each (what ingest puts at low traffic; every "
                  "delete is a binlog record, fsynced with `-f 0`).", "",
                  "| beanstalkd | ingest requests/s | p50 ms | p99 ms | events per put | "
                  "drain, 1-event jobs/s |", "|---|---|---|---|---|---|"]  # fmt: skip
        for mode, r in f.items():
            drain = r.get("drain_one_event_jobs_per_s")
            lines.append(f"| `{mode}` | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['events_per_job']} | "
                         f"{f'{drain:,}' if drain else '-'} |")  # fmt: skip
        lines.append("")
    if "drain" in results:
        d = results["drain"]
        rounds = d.get("rounds", 1)
        modes = list(d["consumer_events_per_s"])
        lines += [f"### Drain ({d['events']:,} events, {d['events_per_job']} per job, "
                  f"best of {rounds} interleaved rounds)", "",
                  "| writer | " + " | ".join(f"beanstalkd `{m}`" for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]  # fmt: skip
        for name, value in d["ceilings_rows_per_s"].items():
            cells = " | ".join([f"{value:,} (no beanstalkd)"] + [""] * (len(modes) - 1))
            lines.append(f"| {name} (rows prebuilt in Python, 1000 per COPY) | {cells} |")
        for threads in d["consumer_events_per_s"][modes[0]]:
            cells = " | ".join(f"{d['consumer_events_per_s'][m][threads]:,}" for m in modes)
            lines.append(f"| trackbuf consumer, {threads} thread(s) | {cells} |")
        ratios = ", ".join(f"`{m}`: **{d['best_vs_copy_staging'][m]}**" for m in modes)
        raw = ", ".join(f"`{m}`: {d['best_vs_raw_copy'][m]}" for m in modes)
        lines += ["", f"Best consumer / COPY+staging+ON CONFLICT: {ratios} (/ raw COPY: {raw}).",
                  ""]  # fmt: skip
    if "scaling" in results:
        lines += _scaling_lines(results["scaling"])
    if "report" in results:
        r = results["report"]
        lines += [f"### Report time (`trackbuf stats`, one campaign of {r['events']:,} events)",
                  "", f"{r['recipients']:,} recipients; {r['rollup_rows']:,} rollup rows; "
                  f"written by SQL in {r['fill_s']} s, counted by `trackbuf rollups rebuild` in "
                  f"{r['rebuild_s']} s. The report read on an open connection, "
                  f"{len(r['report_ms'])} shapes:", "",
                  "| report | median ms | max ms |", "|---|---|---|"]  # fmt: skip
        for shape, t in r["report_ms"].items():
            lines.append(f"| {shape} | **{t['median_ms']}** | {t['max_ms']} |")
        lines += ["", f"The whole command, a new Python process included: {r['cli_process_s']} s "
                  "(mostly Python starting up).", ""]  # fmt: skip
    if "cost" in results:
        lines += _cost_lines(results["cost"])
    if "idle" in results:
        lines += _idle_lines(results["idle"])
    if "backlog" in results:
        b = results["backlog"]
        lines += ["### Backlog", "",
                  f"{b['events']:,} events ({b['jobs']:,} jobs) queued with PostgreSQL stopped; "
                  f"drained in **{b['drain_s']} s** ({b['events_per_s']:,} events/s) after it "
                  f"started; {b['stored']:,} rows stored.", "",
                  f"beanstalkd RSS {b['beanstalkd_rss_empty_mb']} MB empty, "
                  f"{b['beanstalkd_rss_full_mb']} MB full: "
                  f"**{b['beanstalkd_mb_per_million_events']} MB per million queued events**.",
                  ""]  # fmt: skip
    if "memory" in results:
        m = results["memory"]
        lines += ["### Consumer memory", "",
                  f"{m['events']:,} events through one consumer (4 threads), "
                  f"{m['events_per_cycle']:,} per fill-and-drain cycle; RSS after each cycle "
                  f"(MB): {m['rss_mb']}. Highest in the first half "
                  f"{m['first_half_max_mb']} MB, in the second half "
                  f"**{m['second_half_max_mb']} MB**.", ""]  # fmt: skip
    if "e2e" in results:
        e = results["e2e"]
        c = e["client"]
        lines += ["### End-to-end latency", "",
                  f"wrk paced at {e['target_rate']:,} requests/s for {e['duration_s']:.0f} s "
                  f"({c['requests_per_s']:,.0f}/s answered, HTTP p99 {c['p99_ms']} ms); "
                  f"{e['stored']:,} rows. occurred_at to commit: p50 **{e['e2e_p50_s']} s**, "
                  f"p99 **{e['e2e_p99_s']} s**.", "",
                  f"RSS every 10 s (MB): ingest {e['rss_mb']['ingest']}, "
                  f"consumer {e['rss_mb']['consumer']}.", ""]  # fmt: skip
    if "spike" in results:
        s = results["spike"]
        c = s["client"]
        back_up = s["database_down_s"][1]
        empty = next((q["t"] for q in s["queue"] if q["t"] > back_up and not q["ready_jobs"]), None)
        peak = max((q["ready_jobs"] for q in s["queue"]), default=0)
        lines += ["### Spike demonstration", "",
                  f"{s['duration_s']:.0f} s at {c['rate_per_s']:,} req/s with PostgreSQL stopped "
                  f"from {s['database_down_s'][0]} s to {s['database_down_s'][1]} s: "
                  f"{c['acknowledged']:,} acknowledged, {c['failed']} failed, client p99 "
                  f"{c['p99_ms']} ms; the queue peaked at {peak:,} jobs and was empty again at "
                  f"{empty} s; **lost {s['lost']}**.", "", "![spike](benchmarks/spike.png)",
                  ""]  # fmt: skip
    return "\n".join(lines)


def update_markdown(path: Path, results: dict[str, Any], command: str) -> None:
    """Replace the generated block of BENCHMARKS.md, keeping the prose around it."""
    block = f"{START}\n_Generated by `{command}`._\n\n{tables(results)}\n{END}"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    path.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text,
                           flags=re.DOTALL))  # fmt: skip


def _share(paced: dict[str, Any], ing: dict[str, Any]) -> str:
    """What wrk's per-connection pacing delivered, as a share of the measured maximum:
    it often falls well short of the rate asked, and a target stated "at 70%" is only
    shown at the rate actually delivered."""
    return f"{paced['requests_per_s'] / ing['trackbuf_ingest']['requests_per_s']:.0%}"
