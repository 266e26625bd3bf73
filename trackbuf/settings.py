"""Settings: read once from ``TRACKBUF_*`` variables, CLI flags over them, then frozen.

Every setting has exactly one field here, one environment variable (``TRACKBUF_`` +
the field name in upper case) and one CLI flag (``--`` + the field name with dashes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from trackbuf import beanstalk, codec
from trackbuf.redact import masked
from trackbuf.redirect_hosts import RedirectHosts, RedirectHostsError

ENV_PREFIX = "TRACKBUF_"
# A tombstone kept longer than a century is a mistake, and far past it the date would
# no longer fit PostgreSQL's timestamp range.
MAX_FORGET_KEEP_DAYS = 36_500
# Every event of a job may wait this long for the job to fill: a few milliseconds on an
# answer that takes one is a trade; past this it would be a delay users notice.
MAX_JOB_LINGER_MS = 50.0
# The high-water mark per beanstalkd server. beanstalkd holds 168.5 MB per million
# queued events (BENCHMARKS.md, jobs of 25 events), so 1 GiB is about 6.4 million
# events, 10 minutes of a 10,000 events/s outage, before ingest spills to disk; it
# suits a beanstalkd with 2 GiB of memory to itself (docs/SCALING.md has the sizing).
QUEUE_MAX_BYTES = 1 << 30


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default="", metadata={"help": "PostgreSQL DSN (asyncpg form)"})
    beanstalkd: str = field(
        default="127.0.0.1:11300",
        metadata={"help": "beanstalkd host:port, or a pool: host:port,host:port,..."},
    )
    tube: str = field(default="trackbuf-events", metadata={"help": "beanstalkd tube"})
    listen: str = field(
        default="127.0.0.1:8080",
        metadata={"help": "ingest's public host:port: /o/, /c/, /healthz, /readyz, /robots.txt"},
    )
    workers: int = field(default=1, metadata={"help": "ingest worker processes (one socket)"})
    public_url: str = field(
        default="http://127.0.0.1:8080", metadata={"help": "base URL printed in links"}
    )
    signing_keys: str = field(
        default="", metadata={"help": "kid:secret[,kid:secret...]; the first signs, all verify"}
    )
    signing_keys_file: str = field(
        default="",
        metadata={"help": "file of kid:secret entries instead (ingest re-reads it on SIGHUP)"},
    )
    data_dir: str = field(
        default="./trackbuf-data",
        metadata={
            "help": "where `up` keeps its servers' data and ingest its spool (unless "
            "--spool-dir); operator commands read the trackbuf.env of `up` there"
        },
    )
    threads: int = field(default=4, metadata={"help": "consumer worker threads"})
    batch_size: int = field(default=1000, metadata={"help": "events per database batch"})
    linger_ms: int = field(default=200, metadata={"help": "max wait to fill a batch"})
    burst: bool = field(default=False, metadata={"help": "drain what is queued, then exit"})
    admin_listen: str = field(
        default="127.0.0.1:9107",
        metadata={"help": "ingest's private host:port for /metrics (never the public one)"},
    )
    metrics_listen: str = field(
        default="127.0.0.1:9108", metadata={"help": "consumer /metrics, /healthz, /readyz"}
    )
    job_ttr: int = field(
        default=120, metadata={"help": "seconds a consumer may hold a job before it returns"}
    )
    fast_path: bool = field(
        default=True,
        metadata={
            "help": "ingest: answer plain pixel and click GETs without aiohttp's "
            "request machinery (off: aiohttp answers every request)"
        },
    )
    job_linger_ms: float = field(
        default=5.0,
        metadata={
            "help": "ingest: max wait of a job's first event for others to join it "
            "(0 to 50; 0 puts each job at once)"
        },
    )
    max_job_bytes: int = field(
        default=60000,
        metadata={"help": "upper bound on one job body (also capped by the server's limit)"},
    )
    ip_mode: str = field(
        default="full", metadata={"help": "client IP storage: full, anonymize or drop"}
    )
    user_agent_mode: str = field(
        default="full", metadata={"help": "client user agent storage: full or drop"}
    )
    trust_forwarded: bool = field(
        default=False,
        metadata={
            "help": "take the client IP from the last X-Forwarded-For hop (only behind "
            "a proxy that appends it)"
        },
    )
    redirect_hosts: str = field(
        default="",
        metadata={"help": "hosts clicks may go to: host or *.domain, comma-separated (all)"},
    )
    spool_dir: str = field(
        default="", metadata={"help": "ingest spool directory (default: <data dir>/spool)"}
    )
    queue_max_bytes: int = field(
        default=QUEUE_MAX_BYTES,
        metadata={
            "help": "high-water mark per beanstalkd server, bytes of its memory; "
            "beyond it ingest spools to disk (docs/SCALING.md)"
        },
    )
    spool_max_bytes: int = field(
        default=1 << 30, metadata={"help": "spool size limit; beyond it events are lost"}
    )
    spool_fsync: str = field(
        default="always", metadata={"help": "always (sync before answering) or never"}
    )
    shutdown_timeout: float = field(
        default=10.0,
        metadata={"help": "seconds allowed for a graceful stop; past it the process exits 1"},
    )
    forget_keep_days: int = field(
        default=30,
        metadata={"help": "days `forget` keeps dropping a person's queued and spooled events"},
    )
    apple_egress_csv: str = field(
        default="",
        metadata={
            "help": "Apple's egress-ip-ranges.csv, downloaded by you, instead of the shipped "
            "snapshot (Mail Privacy Protection); empty: the snapshot"
        },
    )

    def __post_init__(self) -> None:
        positive = (
            "workers", "threads", "batch_size", "job_ttr", "max_job_bytes", "spool_max_bytes",
            "queue_max_bytes",
            "forget_keep_days",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_name(name)} must be at least 1")
        if self.max_job_bytes > codec.MAX_JOB_BYTES:
            # ingest's spool stores one job per record and must read every record back.
            raise SettingsError(
                f"{env_name('max_job_bytes')} must be at most {codec.MAX_JOB_BYTES} "
                f"(1 MiB), got {self.max_job_bytes}"
            )
        if self.forget_keep_days > MAX_FORGET_KEEP_DAYS:
            raise SettingsError(
                f"{env_name('forget_keep_days')} must be at most {MAX_FORGET_KEEP_DAYS}, "
                f"got {self.forget_keep_days}"
            )
        if self.linger_ms < 0:
            raise SettingsError(f"{env_name('linger_ms')} must not be negative")
        if not 0 <= self.job_linger_ms <= MAX_JOB_LINGER_MS:
            raise SettingsError(
                f"{env_name('job_linger_ms')} must be between 0 and {MAX_JOB_LINGER_MS} "
                f"(milliseconds), got {self.job_linger_ms}"
            )
        if self.ip_mode not in ("full", "anonymize", "drop"):
            raise SettingsError(f"{env_name('ip_mode')} must be full, anonymize or drop")
        if self.user_agent_mode not in ("full", "drop"):
            raise SettingsError(f"{env_name('user_agent_mode')} must be full or drop")
        if self.spool_fsync not in ("always", "never"):
            raise SettingsError(f"{env_name('spool_fsync')} must be always or never")
        for name in ("listen", "admin_listen", "metrics_listen"):
            parse_hostport(getattr(self, name), env_name(name))
        parse_pool(self.beanstalkd, env_name("beanstalkd"))
        try:
            beanstalk.tube_name(self.tube)
        except ValueError as exc:
            raise SettingsError(f"{env_name('tube')}: {exc}") from None
        try:
            RedirectHosts.parse(self.redirect_hosts)
        except RedirectHostsError as exc:
            raise SettingsError(f"{env_name('redirect_hosts')}: {exc}") from None
        if not self.public_url.startswith(("http://", "https://")):
            raise SettingsError(f"{env_name('public_url')} must start with http:// or https://")

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug output: secrets are shown as set or not.
        shown = []
        for f in fields(self):
            value = masked(f.name, getattr(self, f.name))
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def beanstalkd_addresses(self) -> list[tuple[str, int]]:
        """Every server of the beanstalkd pool, in the order given (one for a single
        server)."""
        return parse_pool(self.beanstalkd, env_name("beanstalkd"))

    @property
    def spool_path(self) -> str:
        return self.spool_dir or os.path.join(self.data_dir, "spool")

    def require_database(self) -> str:
        if not self.database_url:
            raise SettingsError(f"{env_name('database_url')} is not set")
        return self.database_url


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{what} must be host:port, got {value!r}")
    return host.strip("[]"), int(port)


def parse_pool(value: str, what: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]``: a pool of independent servers. The same server twice
    is refused: it would get twice the share of puts and two reservers for one queue,
    which is surely a typo, not a plan."""
    parts = [part.strip() for part in value.split(",")]
    if not value.strip() or any(not part for part in parts):
        raise SettingsError(f"{what} must be host:port or host:port,host:port,..., got {value!r}")
    addresses = [parse_hostport(part, what) for part in parts]
    seen: set[tuple[str, int]] = set()
    for part, address in zip(parts, addresses, strict=True):
        if address in seen:
            raise SettingsError(f"{what} names {part} twice")
        seen.add(address)
    return addresses


def _convert(name: str, raw: str, kind: Any) -> Any:
    if kind in (bool, "bool"):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{env_name(name)} must be a boolean, got {raw!r}")
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)} must be a number, got {raw!r}") from None
    return raw


def field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(Settings)}


def load(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Environment first, then explicit overrides (CLI flags); unknown names are errors."""
    environ = os.environ if environ is None else environ
    types = field_types()
    values: dict[str, Any] = {}
    for name, kind in types.items():
        raw = environ.get(env_name(name))
        if raw is not None:
            values[name] = _convert(name, raw, kind)
    for name, value in (overrides or {}).items():
        if name not in types:
            raise SettingsError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    return Settings(**values)


def as_environ(settings: Settings) -> dict[str, str]:
    """The variables that reproduce these settings in a child process."""
    out: dict[str, str] = {}
    for name, value in dataclasses.asdict(settings).items():
        out[env_name(name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out
