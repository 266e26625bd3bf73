"""The reference tables in the docs, generated from the code they describe.

``docs/CONFIGURATION.md`` holds the settings table (from ``Settings``' help text) and
the command table (from the argument parser); ``docs/MONITORING.md`` holds the metric
table (from the metric registries of ingest and the consumer). Each table sits between
``<!-- generated:NAME:start -->`` and ``<!-- generated:NAME:end -->``; everything
outside those markers is written by hand.

    python -m commands.reference           # rewrite the tables in place
    python -m commands.reference --check   # exit 1 if a committed table is stale

``tests/test_docs.py`` fails when a committed table differs from what this makes, so a
new setting, flag, command or metric cannot ship undocumented.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from commands.main import build_parser, metric_makers, queue_metric_families
from trackbuf.settings import Settings, env_name, flag_name

ROOT = Path(__file__).resolve().parent.parent
LOG_LEVEL_ENV = "TRACKBUF_LOG_LEVEL"
# Histograms expose these series besides their name; counters add _total (and _created).
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Metric:
    name: str  # as scraped: counters with _total
    kind: str
    labels: tuple[str, ...]
    help: str
    process: str  # which process serves it

    def series(self) -> set[str]:
        """Every series name a query may use for this metric."""
        if self.kind == "histogram":
            return {self.name, *(self.name + s for s in HISTOGRAM_SUFFIXES)}
        return {self.name}


@dataclass(frozen=True)
class Command:
    path: str  # "link open"
    help: str
    options: tuple[str, ...]  # its own --flags, in parser order
    settings: tuple[str, ...]  # the flags that set a TRACKBUF_ setting
    positionals: tuple[str, ...]
    spellings: frozenset[str]  # every way to write its flags (--no-burst too)


def metrics() -> list[Metric]:
    """Every metric ingest and the consumer export, in registry order."""
    from prometheus_client import CollectorRegistry

    found: list[Metric] = []
    for process, make in metric_makers():
        registry = CollectorRegistry()
        made = make(registry)
        # prometheus-client keeps a metric's label names only on the object (its
        # public describe() carries none): read them there, by the field's name.
        labels = {
            getattr(made, f.name)._name: tuple(getattr(getattr(made, f.name), "_labelnames", ()))
            for f in fields(made)
            if hasattr(getattr(made, f.name), "_name")
        }
        for family in registry.collect():
            found.append(_metric(family, labels.get(family.name, ()), process))
    for family in queue_metric_families():
        found.append(_metric(family, tuple(getattr(family, "_labelnames", ())), "consumer"))
    return found


def _metric(family: Any, labels: tuple[str, ...], process: str) -> Metric:
    name = family.name + "_total" if family.type == "counter" else family.name
    return Metric(name, family.type, labels, family.documentation, process)


def commands(parser: argparse.ArgumentParser | None = None) -> list[Command]:
    """Every ``trackbuf`` command and subcommand that runs something, with its flags."""
    if parser is None:
        parser = build_parser()
    setting_flags = {flag_name(f.name) for f in fields(Settings)}
    return list(_walk(parser, "", "", setting_flags))


def _walk(
    parser: argparse.ArgumentParser, path: str, what: str, setting_flags: set[str]
) -> Iterator[Command]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options: list[str] = []
    settings: list[str] = []
    positionals: list[str] = []
    spellings: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if not action.option_strings:
            positionals.append(action.dest)
            continue
        spellings.update(action.option_strings)
        # The first spelling is the flag itself (--burst before --no-burst).
        flag = action.option_strings[0]
        (settings if flag in setting_flags else options).append(flag)
    if path and not subparsers:
        yield Command(path, what, tuple(options), tuple(settings), tuple(positionals),
                      frozenset(spellings))  # fmt: skip
    for sub in subparsers:
        helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
        for name, child in sub.choices.items():
            yield from _walk(child, f"{path} {name}".strip(), helps.get(name, ""), setting_flags)


def global_options(parser: argparse.ArgumentParser | None = None) -> tuple[str, ...]:
    """Options taken before the command (``--log-level``)."""
    if parser is None:
        parser = build_parser()
    return tuple(
        spelling
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
        for spelling in a.option_strings
    )


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if value == "":
        return "(none)"
    return f"`{value}`"


def settings_table() -> str:
    """One row per setting: variable, flag, default, meaning, the commands taking it."""
    by_flag: dict[str, list[str]] = {}
    for command in commands():
        for flag in command.settings:
            by_flag.setdefault(flag, []).append(command.path)
    defaults = Settings()
    rows = ["| variable | flag | default | meaning | commands |", "|---|---|---|---|---|"]
    for f in fields(Settings):
        flag = flag_name(f.name)
        taken = ", ".join(f"`{c}`" for c in by_flag.get(flag, [])) or "(none)"
        meaning = _cell(f.metadata.get("help", ""))
        default = _default(getattr(defaults, f.name))
        rows.append(f"| `{env_name(f.name)}` | `{flag}` | {default} | {meaning} | {taken} |")
    rows.append(f"| `{LOG_LEVEL_ENV}` | `--log-level` (before the command) | `INFO` | "
                "log level: `DEBUG`, `INFO`, `WARNING` or `ERROR` | every command |")  # fmt: skip
    return "\n".join(rows)


def commands_table() -> str:
    rows = ["| command | what | its flags | settings flags |", "|---|---|---|---|"]
    for c in commands():
        own = [f"`{o}`" for o in c.options] + [f"`<{p}>`" for p in c.positionals]
        rows.append(f"| `trackbuf {c.path}` | {_cell(c.help)} | {', '.join(own) or '-'} | "
                    f"{', '.join(f'`{s}`' for s in c.settings) or '-'} |")  # fmt: skip
    return "\n".join(rows)


def metrics_table() -> str:
    rows = ["| metric | type | labels | served by | what |", "|---|---|---|---|---|"]
    for m in metrics():
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {m.process} | {_cell(m.help)} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# (file, marker name, what makes the table)
TABLES: tuple[tuple[str, str, Callable[[], str]], ...] = (
    ("docs/CONFIGURATION.md", "settings", settings_table),
    ("docs/CONFIGURATION.md", "commands", commands_table),
    ("docs/MONITORING.md", "metrics", metrics_table),
)


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated:{name}:start[^>]*-->\n)(.*?)(<!-- generated:{name}:end -->)", re.S
    )


def render(text: str, name: str, table: str) -> str:
    """``text`` with the block ``name`` holding ``table``; ValueError if it has none."""
    pattern = _block(name)
    if not pattern.search(text):
        raise ValueError(f"no <!-- generated:{name}:start --> ... end block")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(3), text, count=1)


def stale(root: Path = ROOT) -> list[str]:
    """The files whose generated tables differ from what the code makes now."""
    out = []
    for path, new in _rendered(root).items():
        if (root / path).read_text() != new:
            out.append(path)
    return out


def _rendered(root: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    for path, name, make in TABLES:
        text = texts.get(path) or (root / path).read_text()
        texts[path] = render(text, name, make())
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commands.reference", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    args = parser.parse_args(argv)
    if args.check:
        behind = stale()
        for path in behind:
            print(f"{path}: generated tables are stale; run python -m commands.reference",
                  file=sys.stderr)  # fmt: skip
        return 1 if behind else 0
    for path, text in _rendered(ROOT).items():
        (ROOT / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
