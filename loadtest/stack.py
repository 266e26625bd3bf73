"""The processes a benchmark runs: servers, trackbuf commands, baselines, nginx, wrk."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from loadtest.servers import Beanstalkd, Postgres, free_port, rss_bytes, wait_port
from trackbuf.httpwait import wait_http
from trackbuf.settings import Settings

KEYS = "k1:benchmark-signing-key-0123456789"
TUBE = Settings().tube  # the stack runs trackbuf with its default tube
REPO = Path(__file__).resolve().parent.parent


class Proc:
    """A child process that is always stopped, even when a benchmark fails."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.admin = ""  # an ingest's private /metrics address, once known
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)


@dataclass
class Stack:
    """PostgreSQL (migrated) and beanstalkd for one benchmark section."""

    work: Path
    pg: Postgres
    bs: Beanstalkd
    dsn: str

    @classmethod
    def start(cls, work: Path, name: str) -> Stack:
        work.mkdir(parents=True, exist_ok=True)
        pg = Postgres(durable=True).start()
        bs = Beanstalkd(work / f"{name}-binlog", "-f", "0").start()
        dsn = pg.dsn()
        subprocess.run(
            [sys.executable, "-m", "commands", "migrate"],
            env={**os.environ, "TRACKBUF_DATABASE_URL": dsn},
            check=True, capture_output=True, cwd=REPO,
        )  # fmt: skip
        return cls(work, pg, bs, dsn)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKBUF_")}
        env.update(
            TRACKBUF_DATABASE_URL=self.dsn,
            TRACKBUF_BEANSTALKD=self.bs.address,
            TRACKBUF_SIGNING_KEYS=KEYS,
            TRACKBUF_DATA_DIR=str(self.work / "data"),
            TRACKBUF_LOG_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    def trackbuf(self, name: str, *args: str, **env: str) -> Proc:
        return Proc(
            [sys.executable, "-m", "commands", *args], self.work / f"{name}.log", self.env(**env)
        )

    def sql(self, query: str) -> object:
        async def go() -> object:
            conn = await asyncpg.connect(self.dsn)
            try:
                return await conn.fetchval(query)
            finally:
                await conn.close()

        return asyncio.run(go())

    def rows(self) -> int:
        return int(str(self.sql("SELECT count(*) FROM events")))

    def close(self) -> None:
        self.bs.kill()
        self.pg.destroy()


def start_ingest(stack: Stack, name: str = "ingest", *args: str, **env: str) -> tuple[Proc, str]:
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = stack.trackbuf(name, "ingest", *args, TRACKBUF_LISTEN=listen,
                          TRACKBUF_ADMIN_LISTEN=admin, **env)  # fmt: skip
    proc.admin = admin  # /metrics is there, not on the public listener
    wait_http(f"http://{listen}/healthz", [proc.proc])
    return proc, listen


def start_consumer(stack: Stack, name: str = "consumer", **env: str) -> tuple[Proc, str]:
    listen = f"127.0.0.1:{free_port()}"
    proc = stack.trackbuf(name, "consume", TRACKBUF_METRICS_LISTEN=listen, **env)
    wait_http(f"http://{listen}/healthz", [proc.proc])
    return proc, listen


def start_baseline(stack: Stack, kind: str) -> tuple[Proc, str]:
    listen = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "loadtest.baselines", kind, "--listen", listen,
           "--dsn", stack.dsn, "--keys", KEYS]  # fmt: skip
    proc = Proc(cmd, stack.work / f"{kind}.log")
    wait_port(int(listen.rsplit(":", 1)[1]), proc=proc.proc)
    return proc, listen


def start_nginx(work: Path) -> tuple[Proc, str]:
    """nginx ``empty_gif`` with one worker: the machine's ceiling for answering pixels."""
    binary = shutil.which("nginx")
    if binary is None:
        raise RuntimeError("nginx is not installed: apt-get install -y nginx-light")
    port = free_port()
    prefix = work / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\npid nginx.pid;\nerror_log logs/error.log;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; server {{ listen 127.0.0.1:{port};\n"
        "  location /o/ { empty_gif; add_header Cache-Control no-store; } } }\n"
    )
    proc = Proc([binary, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                work / "nginx.log")  # fmt: skip
    wait_port(port, proc=proc.proc)
    return proc, f"127.0.0.1:{port}"


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx_3xx: int
    requests: int = 0  # responses wrk received in all


def wrk(
    listen: str, urls_file: Path, duration_s: float, connections: int = 64, delay_ms: float = 0
) -> WrkResult:
    script = REPO / "loadtest" / "wrk" / "urls.lua"
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{max(int(duration_s), 1)}s", "--latency",
         "-s", str(script), f"http://{listen}"],
        env={**os.environ, "URLS_FILE": str(urls_file), "DELAY_MS": str(int(delay_ms))},
        capture_output=True, text=True, check=True, timeout=duration_s + 60,
    ).stdout  # fmt: skip

    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not match:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in ", out)
    return WrkResult(
        requests_per_s=float(rps.group(1)) if rps else 0.0,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        requests=int(total.group(1)) if total else 0,
    )
