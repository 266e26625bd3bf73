"""``<data dir>/trackbuf.env``: how operator commands find a running ``trackbuf up``.

``up`` writes it while it runs and removes it when it stops. A ``kill -9`` of ``up``
leaves it behind, with a DSN and keys of servers that are gone, so the file records
its owner (pid and process start time) and a reader ignores it once that process has
gone: a pid alone is not enough, as the system hands it out again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_FILE = "trackbuf.env"
OWNER_PID = "TRACKBUF_UP_PID"
OWNER_STARTED = "TRACKBUF_UP_STARTED"


@dataclass(frozen=True)
class Found:
    path: Path
    values: dict[str, str] = field(default_factory=dict)
    # Why the file is not used, for a warning; "" when there is none or it is fresh.
    stale: str = ""


def write(path: Path, values: Mapping[str, str]) -> None:
    """Write the file (mode 0600: it holds keys and the DSN) owned by this process."""
    pid = os.getpid()
    lines = [
        f"# written by `trackbuf up` (pid {pid}); removed when it stops",
        f"{OWNER_PID}={pid}",
        f"{OWNER_STARTED}={process_start(pid)}",
        *(f"{name}={value}" for name, value in values.items()),
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def read(data_dir: str) -> Found:
    """The file's settings if the ``up`` that wrote it still runs; else none, and why."""
    path = Path(data_dir).absolute() / ENV_FILE
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return Found(path)
    except OSError as exc:
        return Found(path, stale=f"cannot read it: {exc.strerror}")
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("TRACKBUF_"):
            values[name] = value
    pid, started = values.pop(OWNER_PID, ""), values.pop(OWNER_STARTED, "")
    if not pid.isdigit():
        return Found(path, stale="it names no owner process")
    if not owner_alive(int(pid), started):
        return Found(path, stale=f"the trackbuf up that wrote it (pid {pid}) is gone")
    return Found(path, values)


def owner_alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    now = process_start(pid)
    # Without /proc (not Linux) there is no start time to compare: the pid must do.
    return not (now and started and now != started)


def process_start(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot, from /proc), or "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from after it.
    # starttime is field 22; the fields after the name begin at field 3.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""
