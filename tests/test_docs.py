"""The docs name only settings, metrics, commands and flags that exist, and miss none.

Settings, commands and metrics are listed once, in tables generated from the code
(``python -m commands.reference``): the committed tables must equal what the code makes
now, so a new setting, flag, command or metric cannot ship undocumented. Everywhere
else in the docs (README.md, docs/*.md, BENCHMARKS.md, and the deployment files under
deploy/), every ``TRACKBUF_`` variable, ``trackbuf_`` metric, ``trackbuf <command>``
and flag of one that is named must exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from commands import reference
from trackbuf.settings import Settings, env_name, flag_name

ROOT = Path(__file__).resolve().parent.parent
# Measured figures live only in BENCHMARKS.md and benchmarks/results.json; every other
# page for people (README.md, docs/*.md) links there instead of copying them. A figure
# that is not a measurement (the load a test sends, a sizing target, the unit of a
# model) is allowed on its page here, with the reason: (page, figure, why).
STATED_INPUTS: tuple[tuple[str, str, str], ...] = (
    ("docs/RELIABILITY.md", "400 req/s", "the load a fault test sends"),
    ("docs/RELIABILITY.md", "300 req/s", "the load a fault test sends"),
    ("docs/RELIABILITY.md", "800 req/s", "the load a fault test sends"),
    ("docs/RELIABILITY.md", "600 req/s", "the load a fault test sends"),
    ("docs/RELIABILITY.md", "800 requests/s", "the load a fault test sends"),
    (
        "docs/ARCHITECTURE.md",
        "10,000 events/s",
        "the highest rate test_reserve_cost.py puts jobs at",
    ),
    ("docs/SCALING.md", "10,000 events/s", "the sizing target, and the model's unit"),
)
SETTING = re.compile(r"\bTRACKBUF_[A-Z0-9_]+")
METRIC = re.compile(r"\btrackbuf_[a-z0-9_]+")
METRIC_PREFIXES = ("trackbuf_ingest_", "trackbuf_consumer_", "trackbuf_queue_")
FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"`([^`\n]+)`")
# "trackbuf <command>" at a command's position: the start, or after a shell separator,
# `$(`, `exec`, `env` assignments or a prompt. Not "trackbuf never buries" in prose
# (prose is not scanned) and not "trackbuf rewrite: ..." (a message it prints).
COMMAND = re.compile(r"(?:^|[\s;|&(]|\$\()trackbuf\s+([a-z][a-z-]*)(?![:\w/.-])")
# A throughput figure: "41.5k requests/s", "55,000 events/s", "1.28x".
FIGURE = re.compile(
    r"\b\d[\d,.]*k?\s?(?:req|requests|events|rows|jobs)/s\b|\b\d+\.\d+x\b", re.IGNORECASE
)


def linking_pages() -> dict[str, str]:
    """README.md and every page under docs/: the pages that link to the benchmarks."""
    names = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    return {name: (ROOT / name).read_text() for name in names}


def copied_figures(
    pages: dict[str, str], inputs: tuple[tuple[str, str, str], ...] = STATED_INPUTS
) -> list[str]:
    """Each figure on the pages that is not a stated input of that page."""
    allowed = {(page, figure) for page, figure, _ in inputs}
    return [
        f"{name}:{number}: {figure}"
        for name, text in pages.items()
        for number, line in enumerate(text.splitlines(), 1)
        for figure in FIGURE.findall(line)
        if (name, figure) not in allowed
    ]


def documents() -> dict[str, str]:
    """Every page and deployment file a reader or an operator uses, by path."""
    names = ["README.md", "BENCHMARKS.md"]
    names += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    deploy = ROOT / "deploy"
    if deploy.is_dir():
        names += sorted(str(p.relative_to(ROOT)) for p in deploy.rglob("*") if p.is_file())
    return {name: (ROOT / name).read_text() for name in names}


def known_variables() -> set[str]:
    """Every setting, and every other TRACKBUF_ variable the code itself reads (the
    test and dev switches, the ones ingest's supervisor hands its workers)."""
    known = {env_name(f.name) for f in fields(Settings)} | {reference.LOG_LEVEL_ENV}
    listed = subprocess.run(
        ["git", "ls-files", "-z", "*.py", "dev"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        # This file names made-up variables on purpose, to see them refused.
        if path.is_file() and path != Path(__file__).resolve():
            known |= set(SETTING.findall(path.read_text()))
    return known


def known_metric_series() -> set[str]:
    return {series for m in reference.metrics() for series in m.series()}


def other_identifiers() -> set[str]:
    """trackbuf_ names that are not metrics: SQL functions, benchmark server names."""
    found: set[str] = set()
    for pattern in ("consumer/**/*.sql", "loadtest/**/*.py"):
        for path in ROOT.glob(pattern):
            found |= set(METRIC.findall(path.read_text()))
    return {name for name in found if not name.startswith(METRIC_PREFIXES)}


def code_fragments(text: str) -> list[tuple[int, str]]:
    """(line number, code) for each fenced code line and each inline code span; shell
    comments are dropped from fenced lines (they describe, they do not run)."""
    out: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code = _strip_comment(line)
            if code.strip():
                out.append((number, code))
        else:
            out += [(number, span) for span in SPAN.findall(line)]
    return out


def _strip_comment(line: str) -> str:
    # A "#" starting a word outside quotes begins a shell comment.
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def unknown_names(docs: dict[str, str]) -> list[str]:
    variables = known_variables()
    series = known_metric_series() | other_identifiers()
    wrong = []
    for name, text in docs.items():
        for number, line in enumerate(text.splitlines(), 1):
            wrong += [f"{name}:{number}: {v}" for v in SETTING.findall(line) if v not in variables]
            wrong += [
                f"{name}:{number}: {m}"
                for m in METRIC.findall(line)
                # "trackbuf_queue_*" names a family of metrics: fine if it has members.
                if m not in series
                and not (m.endswith("_") and any(s.startswith(m) for s in series))
            ]
    return wrong


def unknown_commands(docs: dict[str, str]) -> list[str]:
    by_path = {c.path: c for c in reference.commands()}
    global_flags = set(reference.global_options())
    wrong = []
    for name, text in docs.items():
        for number, code in code_fragments(text):
            for problem in _command_problems(code, by_path, global_flags):
                wrong.append(f"{name}:{number}: {problem}")
    return wrong


def _command_problems(
    code: str, by_path: dict[str, reference.Command], global_flags: set[str]
) -> list[str]:
    problems = []
    for match in COMMAND.finditer(code):
        rest = re.split(r"\s(?:\||;|&&|\|\||>|<|2>)", code[match.start(1) :], maxsplit=1)[0]
        try:
            words = shlex.split(rest, comments=False)
        except ValueError:
            words = rest.split()
        # Short options are not checked; punctuation after a word is prose around it.
        words = [w.rstrip(",.;)") for w in words if not w.startswith("-") or w.startswith("--")]
        # The command path: the longest run of plain words that names a command.
        path = ""
        for i in range(len(words), 0, -1):
            candidate = " ".join(words[:i])
            if candidate in by_path or any(p.startswith(candidate + " ") for p in by_path):
                path = candidate
                break
        if not path:
            problems.append(f"no command `trackbuf {words[0]}`")
            continue
        if path not in by_path:
            # A group (`trackbuf dead`, `trackbuf link`) named on its own is fine.
            if any(w.startswith("--") for w in words):
                problems.append(f"`trackbuf {path}` needs a subcommand before its flags")
            continue
        allowed = by_path[path].spellings | global_flags | {"--help"}
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in allowed:
                problems.append(f"`trackbuf {path}` has no flag {flag}")
    return problems


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    found = documents()
    assert "docs/CONFIGURATION.md" in found and "docs/MONITORING.md" in found
    return found


def test_the_generated_tables_equal_what_the_code_makes() -> None:
    # On failure: python -m commands.reference rewrites them.
    assert reference.stale() == []


def test_every_setting_has_a_flag_on_a_command_that_uses_it() -> None:
    flags = {flag for c in reference.commands() for flag in c.settings}
    assert {flag_name(f.name) for f in fields(Settings)} - flags == set()


def test_the_docs_name_only_settings_and_metrics_that_exist(docs: dict[str, str]) -> None:
    assert unknown_names(docs) == []


def test_the_docs_name_only_commands_and_flags_that_exist(docs: dict[str, str]) -> None:
    assert unknown_commands(docs) == []


def test_pages_that_link_to_the_benchmarks_copy_no_figures_from_them() -> None:
    assert copied_figures(linking_pages()) == []


def test_every_stated_input_is_still_on_its_page() -> None:
    # An entry whose figure left its page would allow that figure back unseen.
    pages = linking_pages()
    gone = [
        f"{page}: {figure}"
        for page, figure, _ in STATED_INPUTS
        if figure not in FIGURE.findall(pages.get(page, ""))
    ]
    assert gone == []


def test_the_checks_see_what_they_look_for() -> None:
    page = (
        "Set `TRACKBUF_SPOOL_DIR` and `TRACKBUF_SPOOL_DIRR`; watch\n"
        "`trackbuf_ingest_requests_total`, `trackbuf_ingest_requests_sum` and\n"
        "`trackbuf_consumer_request_duration_seconds_bucket`, `trackbuf_queue_*`.\n"
        "Run `trackbuf consume --threads 4`, `trackbuf consume --thread 4`,\n"
        "`trackbuf dead kick --all`, `trackbuf dead --all`, `trackbuf frobnicate now`;\n"
        "`install -g trackbuf deploy/systemd/trackbuf.env /etc/trackbuf/`;\n"
        "trackbuf never buries a job (prose).\n"
        "```sh\n"
        "trackbuf --log-level DEBUG ingest --no-fast-path | tee log  # trackbuf nothing\n"
        "trackbuf link click --campaign c --recipient r --uri https://x.example/\n"
        "trackbuf rewrite: 3 link(s) tracked\n"
        "```\n"
    )
    docs = {"page.md": page}
    assert unknown_names(docs) == [
        "page.md:1: TRACKBUF_SPOOL_DIRR",
        "page.md:2: trackbuf_ingest_requests_sum",
        "page.md:3: trackbuf_consumer_request_duration_seconds_bucket",
    ]
    assert unknown_commands(docs) == [
        "page.md:4: `trackbuf consume` has no flag --thread",
        "page.md:5: `trackbuf dead` needs a subcommand before its flags",
        "page.md:5: no command `trackbuf frobnicate`",
        "page.md:10: `trackbuf link click` has no flag --uri",
    ]
    assert FIGURE.findall("at 41.5k requests/s, 1.28x bare; 55,000 events/s") == [
        "41.5k requests/s",
        "1.28x",
        "55,000 events/s",
    ]
    pages = {"a.md": "at 400 req/s: 41.5k req/s\n", "b.md": "at 400 req/s\n"}
    assert copied_figures(pages, (("a.md", "400 req/s", "the load sent"),)) == [
        "a.md:1: 41.5k req/s",
        "b.md:1: 400 req/s",
    ]


def test_a_stale_table_is_found_and_rewritten() -> None:
    text = "x\n<!-- generated:settings:start -->\nold\n<!-- generated:settings:end -->\ny\n"
    new = reference.render(text, "settings", "| a |")
    assert (
        new == "x\n<!-- generated:settings:start -->\n| a |\n<!-- generated:settings:end -->\ny\n"
    )
    with pytest.raises(ValueError, match="generated:metrics"):
        reference.render(text, "metrics", "| a |")
