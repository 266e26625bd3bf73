"""The ``trackbuf`` command. Every flag also reads ``TRACKBUF_<FLAG>``; the flag wins.

The one module of ``commands`` that imports the services, ``ingest`` and ``consumer``
(``trackbuf ingest``, ``trackbuf consume``, the classifier a rebuild uses, the metric
registries the docs' reference is made from), lazily, so each command loads only what
it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from commands.parser import SuggestingParser
from commands.up import UpError
from trackbuf import envfile
from trackbuf import log as tlog
from trackbuf.redact import masked
from trackbuf.settings import Settings, SettingsError, env_name, flag_name, load
from trackbuf.tokens import MAX_FIELD, MAX_URL, KeyringError, LinkError

_FIELDS = {f.name: f for f in fields(Settings)}

QUEUE = ("beanstalkd", "tube")
INGEST = ("listen", "admin_listen", "workers", *QUEUE, "signing_keys", "signing_keys_file",
          "redirect_hosts", "job_ttr", "max_job_bytes", "ip_mode", "user_agent_mode",
          "trust_forwarded", "data_dir", "spool_dir", "spool_max_bytes", "spool_fsync",
          "queue_max_bytes", "shutdown_timeout", "fast_path", "job_linger_ms")  # fmt: skip
CONSUME = ("database_url", *QUEUE, "threads", "batch_size", "linger_ms", "burst",
           "metrics_listen", "shutdown_timeout", "apple_egress_csv")  # fmt: skip
LINKS = ("public_url", "signing_keys", "signing_keys_file")
# Commands an operator runs beside `trackbuf up`: they read the env file it writes.
# ingest, consume and migrate are what production runs: only their own environment
# counts there, never a file some other process left in a directory.
OPERATOR = ("status", "link", "stats", "events", "dead", "rewrite", "forget", "prune",
            "rollups", "spool")  # fmt: skip
# What each command cannot run without, checked before it starts.
REQUIRED = {"events": ("database_url",), "stats": ("database_url",), "dead": ("database_url",),
            "forget": ("database_url",), "prune": ("database_url",),
            "rollups": ("database_url",),
            "link": ("signing_keys",), "rewrite": ("signing_keys",)}  # fmt: skip


def _env_file() -> envfile.Found:
    return envfile.read(os.environ.get(env_name("data_dir")) or Settings().data_dir)


def _add_settings(
    parser: argparse.ArgumentParser, names: Sequence[str], environ: dict[str, str]
) -> None:
    """One flag per setting; its help shows the value in force, secrets masked."""
    defaults = Settings()
    for name in names:
        spec = _FIELDS[name]
        env = env_name(name)
        current = masked(name, str(environ.get(env, getattr(defaults, name))))
        helptext = f"{spec.metadata.get('help', '')} [env {env}; now: {current}]"
        if spec.type in (bool, "bool"):
            # --no-<flag> turns off what the environment turned on.
            parser.add_argument(flag_name(name), dest=name, default=None, help=helptext,
                                action=argparse.BooleanOptionalAction)  # fmt: skip
        else:
            kind: Callable[[str], Any] = {"int": int, "float": float}.get(str(spec.type), str)
            parser.add_argument(flag_name(name), dest=name, type=kind, default=None, help=helptext)


def _settings(args: argparse.Namespace) -> Settings:
    """Flags over environment over (operator commands only) the env file of a running
    ``trackbuf up``; a file its owner left behind when it died is ignored, with a warning."""
    overrides = {k: v for k, v in vars(args).items() if k in _FIELDS and v is not None}
    environ = dict(os.environ)
    found = envfile.Found(Path())
    if args.command in OPERATOR:
        found = _env_file()
        if found.stale:
            print(f"trackbuf {args.command}: ignoring {found.path}: {found.stale}",
                  file=sys.stderr)  # fmt: skip
        environ = {**found.values, **environ}
    settings = load(environ, overrides=overrides)
    for name in REQUIRED.get(args.command, ()):
        if name == "signing_keys" and settings.signing_keys_file:
            continue  # the keys come from a file instead
        if not getattr(settings, name):
            raise SettingsError(f"{env_name(name)} is not set: {_where_to_look(found)}")
    return settings


def _where_to_look(found: envfile.Found) -> str:
    data_dir = env_name("data_dir")
    if found.stale:
        there = f"{found.path} is from a trackbuf up that is gone"
    else:
        there = f"there is no {found.path}"
    return (f"export it, or run this command where `trackbuf up` runs, or set {data_dir} to "
            f"the data dir of a running `trackbuf up` ({there})")  # fmt: skip


def _explicit(args: argparse.Namespace) -> frozenset[str]:
    given = {k for k, v in vars(args).items() if k in _FIELDS and v is not None}
    return frozenset(given | {name for name in _FIELDS if env_name(name) in os.environ})


def _positive_seconds(text: str) -> float:
    # Rates divide by the time between two samples: 0, negative or nan makes no rate.
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return seconds


def _field(text: str) -> str:
    # Links never carry an empty campaign or recipient, so an empty one is a mistake
    # (an unset shell variable, say), not a request to match nothing or everything.
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _duration(text: str) -> int:
    from trackbuf.links import parse_duration

    try:
        return parse_duration(text)
    except LinkError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="trackbuf", description="Email open and click tracking through a beanstalkd buffer."
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("TRACKBUF_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR, before the command [env TRACKBUF_LOG_LEVEL; "
        "default INFO]",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plain = dict(os.environ)
    beside_up = {**_env_file().values, **plain}  # what OPERATOR commands will use

    up = sub.add_parser("up", help="run everything on this machine (embedded servers if unset)")
    _add_settings(up, ("data_dir", "database_url", "listen", "admin_listen", "public_url",
                       "signing_keys", *QUEUE, "threads", "metrics_listen"), plain)  # fmt: skip
    up.set_defaults(func=_cmd_up)

    ingest = sub.add_parser("ingest", help="serve pixels and click redirects")
    _add_settings(ingest, INGEST, plain)
    ingest.set_defaults(func=_cmd_ingest)

    consume = sub.add_parser("consume", help="drain beanstalkd into PostgreSQL")
    _add_settings(consume, CONSUME, plain)
    consume.set_defaults(func=_cmd_consume)

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    _add_settings(migrate, ("database_url",), plain)
    migrate.set_defaults(func=_cmd_migrate)

    link = sub.add_parser("link", help="print a signed tracking URL")
    link_sub = link.add_subparsers(dest="link_kind", required=True, metavar="KIND")
    for kind, what in (("open", "an open-pixel URL"), ("click", "a click-redirect URL")):
        p = link_sub.add_parser(kind, help=f"print {what}")
        p.add_argument("--campaign", required=True)
        p.add_argument("--recipient", required=True, help="recipient or message id")
        if kind == "click":
            p.add_argument("--url", required=True, help="where the click goes (http/https)")
        p.add_argument(
            "--expires",
            metavar="DURATION",
            help="refuse the link after this long: 90d, 12h, 30m, 45s or 2w (default: never)",
        )
        _add_settings(p, LINKS, beside_up)
        p.set_defaults(func=_cmd_link)

    rewrite = sub.add_parser(
        "rewrite", help="HTML in, tracked HTML out: click URLs for links, an open pixel"
    )
    rewrite.add_argument("--campaign", required=True)
    rewrite.add_argument("--recipient", required=True, help="recipient or message id")
    rewrite.add_argument("--input", help="HTML file to read (default: standard input)")
    rewrite.add_argument("--output", help="file to write (default: standard output)")
    _add_settings(rewrite, LINKS, beside_up)
    rewrite.set_defaults(func=_cmd_rewrite)

    keygen = sub.add_parser("keygen", help="print a new signing key as kid:secret")
    keygen.add_argument("--kid", default="k1")
    keygen.set_defaults(func=_cmd_keygen)

    dead = sub.add_parser("dead", help="inspect and replay events the consumer set aside")
    dead_sub = dead.add_subparsers(dest="dead_action", required=True, metavar="ACTION")
    dead_list = dead_sub.add_parser("list", help="list dead letters with their reasons")
    dead_list.add_argument("--limit", type=int, default=50)
    dead_show = dead_sub.add_parser("show", help="show dead letters in full")
    dead_show.add_argument("ids", type=int, nargs="+")
    for action, what in (("kick", "put back into beanstalkd"), ("delete", "delete for good")):
        p = dead_sub.add_parser(action, help=f"{what}, by id or --all")
        p.add_argument("ids", type=int, nargs="*")
        p.add_argument("--all", action="store_true", dest="everything")
    for p in dead_sub.choices.values():
        _add_settings(p, ("database_url", *QUEUE, "job_ttr"), beside_up)
    dead.set_defaults(func=_cmd_dead)

    spool = sub.add_parser("spool", help="an ingest spool directory")
    spool_sub = spool.add_subparsers(dest="spool_action", required=True, metavar="ACTION")
    spool_replay = spool_sub.add_parser(
        "replay", help="put a spool directory into beanstalkd (a host that is gone)"
    )
    spool_replay.add_argument("--dir", required=True, help="the spool directory to replay")
    spool_replay.add_argument(
        "--timeout", type=_positive_seconds, default=600.0,
        help="seconds to wait for beanstalkd to take it all (> 0)",
    )  # fmt: skip
    _add_settings(spool_replay, (*QUEUE, "job_ttr", "max_job_bytes", "queue_max_bytes",
                                 "spool_max_bytes", "spool_fsync"), beside_up)  # fmt: skip
    spool.set_defaults(func=_cmd_spool)

    status = sub.add_parser("status", help="queue depth, age, rates and health on one screen")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval", type=_positive_seconds, default=1.0, help="seconds between samples (> 0)"
    )
    status.add_argument(
        "--max-age", type=int, default=60, help="oldest ready job age (s) that counts as a problem"
    )
    status.add_argument("--ingest-url", help="ingest admin base URL for /metrics ('' to skip)")
    status.add_argument("--consumer-url", help="consumer base URL for /metrics ('' to skip)")
    _add_settings(status, (*QUEUE, "admin_listen", "metrics_listen"), beside_up)
    status.set_defaults(func=_cmd_status)

    stats = sub.add_parser("stats", help="a campaign's totals and uniques, human vs machine")
    stats.add_argument("--campaign", required=True)
    stats.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    stats.add_argument("--by", choices=("link", "day"), help="every link, or one line per day")
    stats.add_argument("--since", metavar="YYYY-MM-DD", help="first day counted (in --tz)")
    stats.add_argument("--until", metavar="YYYY-MM-DD", help="last day counted (in --tz)")
    stats.add_argument(
        "--tz", default="UTC", help="time zone of the days (--by day, --since, --until)"
    )
    _add_settings(stats, ("database_url",), beside_up)
    stats.set_defaults(func=_cmd_stats)

    rollups = sub.add_parser("rollups", help="recount the rollups that `stats` reads")
    rollups_sub = rollups.add_subparsers(dest="rollups_action", required=True, metavar="ACTION")
    rebuild = rollups_sub.add_parser(
        "rebuild", help="classify unclassified events and recount from the raw events"
    )
    rebuild.add_argument("--campaign", help="only this campaign (default: every campaign)")
    rebuild.add_argument(
        "--reclassify",
        action="store_true",
        help="classify every event again (after a rules update)",
    )
    _add_settings(rebuild, ("database_url", "apple_egress_csv"), beside_up)
    rollups.set_defaults(func=_cmd_rollups)

    forget = sub.add_parser(
        "forget", help="erase a person's events everywhere and drop those still on their way"
    )
    forget.add_argument("--recipient", required=True, type=_field, help="recipient to erase")
    forget.add_argument(
        "--campaign", type=_field, help="erase only this campaign's events (default: all)"
    )
    _add_settings(forget, ("database_url", "forget_keep_days"), beside_up)
    forget.set_defaults(func=_cmd_forget)

    prune = sub.add_parser(
        "prune", help="drop the monthly partitions of events older than a duration"
    )
    prune.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="drop partitions wholly older than this: 180d, 26w, 12h... (keeps the rest)",
    )
    _add_settings(prune, ("database_url",), beside_up)
    prune.set_defaults(func=_cmd_prune)

    events = sub.add_parser("events", help="show recently stored events")
    events.add_argument("--limit", type=int, default=20)
    events.add_argument(
        "--tail", "--follow", action="store_true", help="keep printing new events (like tail -f)"
    )
    _add_settings(events, ("database_url",), beside_up)
    events.set_defaults(func=_cmd_events)
    return parser


def _cmd_up(args: argparse.Namespace) -> int:
    from commands import up

    return up.run(_settings(args), _explicit(args))


def _cmd_ingest(args: argparse.Namespace) -> int:
    from ingest import server
    from trackbuf.keys import load_keyring

    settings = _settings(args)
    # Checked here, before any worker starts: a bad key is one clear error and exit 2,
    # not workers dying and being replaced over and over.
    load_keyring(settings)
    # Each worker of `--workers N` is this command again, one process each.
    return server.run(settings, worker_argv=[sys.executable, "-m", "commands", "ingest"])


def _cmd_consume(args: argparse.Namespace) -> int:
    from consumer import run

    return run.run(_settings(args))


def _cmd_migrate(args: argparse.Namespace) -> int:
    from commands import migrate

    return migrate.run(_settings(args).require_database())


def _cmd_link(args: argparse.Namespace) -> int:
    import time

    from trackbuf import links
    from trackbuf.keys import load_keyring

    settings = _settings(args)
    keyring = load_keyring(settings)
    expires = None
    if args.expires is not None:
        expires = int(time.time()) + links.parse_duration(args.expires)
    base, campaign, recipient = settings.public_url, args.campaign, args.recipient
    try:
        if args.link_kind == "open":
            url = links.open_url(base, keyring, campaign, recipient, expires=expires)
        else:
            url = links.click_url(base, keyring, campaign, recipient, args.url, expires=expires)
    except LinkError as exc:
        raise LinkError(_link_refusal(exc.args[0], args)) from None
    print(url)
    return 0


def _link_refusal(reason: str, args: argparse.Namespace) -> str:
    """The token module's reason code, said in terms of the flags the user gave."""
    if reason == "bad_url":
        given = args.url if len(args.url) <= 200 else args.url[:200] + "..."
        return (f"--url must be an absolute http(s) URL with a host, got {given!r} "
                f"(no spaces or control characters; at most {MAX_URL} characters)")  # fmt: skip
    if reason in ("bad_campaign", "bad_recipient"):
        return f"--{reason.removeprefix('bad_')} must be 1 to {MAX_FIELD} characters"
    return reason


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from trackbuf.keys import load_keyring
    from trackbuf.rewrite import rewrite_html

    settings = _settings(args)
    keyring = load_keyring(settings)
    # Bytes in, bytes out, from a file or a pipe alike: text mode would turn the CRLF
    # of a MIME part into LF, and every byte but the links and the pixel must stay.
    try:
        if args.input:
            with open(args.input, "rb") as source:
                document = source.read().decode("utf-8")
        else:
            document = sys.stdin.buffer.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"trackbuf rewrite: cannot read the HTML: {exc}", file=sys.stderr)
        return 1
    done = rewrite_html(document, settings.public_url, keyring, args.campaign, args.recipient)
    tracked = done.html.encode("utf-8")
    try:
        if args.output:
            with open(args.output, "wb") as target:
                target.write(tracked)
        else:
            sys.stdout.buffer.write(tracked)
            sys.stdout.buffer.flush()
    except OSError as exc:
        print(f"trackbuf rewrite: cannot write the HTML: {exc}", file=sys.stderr)
        return 1
    # The report goes to stderr, so stdout stays the HTML alone for a pipe.
    for href, why in done.skipped:
        print(f"trackbuf rewrite: left as is: {href[:120]} ({why})", file=sys.stderr)
    pixel = "open pixel added" if done.pixel_added else "open pixel already there"
    print(f"trackbuf rewrite: {done.links} link(s) tracked, {len(done.skipped)} left as is, "
          f"{pixel}", file=sys.stderr)  # fmt: skip
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from trackbuf.tokens import new_key

    print(new_key(args.kid))
    return 0


def _cmd_dead(args: argparse.Namespace) -> int:
    from commands import deadletters

    settings = _settings(args)
    action = args.dead_action
    if action == "list":
        return asyncio.run(deadletters.list_(settings, args.limit))
    if action == "show":
        return asyncio.run(deadletters.show(settings, args.ids))
    if not args.ids and not args.everything:
        raise SettingsError(f"dead {action}: give ids or --all")
    if action == "kick":
        return asyncio.run(deadletters.kick(settings, args.ids, args.everything))
    return asyncio.run(deadletters.delete(settings, args.ids, args.everything))


def _cmd_spool(args: argparse.Namespace) -> int:
    from ingest import spool_replay

    return spool_replay.run(_settings(args), args.dir, args.timeout)


def _cmd_status(args: argparse.Namespace) -> int:
    from commands import status

    settings = _settings(args)
    # Ingest's /metrics is on its private admin address, never on the public one.
    ingest = f"http://{settings.admin_listen}" if args.ingest_url is None else args.ingest_url
    consumer = (
        f"http://{settings.metrics_listen}" if args.consumer_url is None else args.consumer_url
    )
    checked = [f"beanstalkd {settings.beanstalkd}"]
    checked += [f"ingest {ingest}"] if ingest else []
    checked += [f"consumer {consumer}"] if consumer else []
    source = f"{', '.join(checked)} (from {_where_from(args, 'beanstalkd')})"
    return status.run(
        settings, args.json, args.watch, args.interval, args.max_age, ingest, consumer, source
    )


def _where_from(args: argparse.Namespace, name: str) -> str:
    """Where an operator command's value of ``name`` came from, as _settings chose it."""
    if getattr(args, name, None) is not None:
        return f"the {flag_name(name)} flag"
    if env_name(name) in os.environ:
        return f"${env_name(name)}"
    found = _env_file()
    if env_name(name) in found.values:
        return f"{found.path}, written by a running trackbuf up"
    return (f"the default: no {env_name(name)} and no running trackbuf up's {found.path}; "
            f"set {env_name('data_dir')} to its data dir")  # fmt: skip


def _cmd_stats(args: argparse.Namespace) -> int:
    from commands import stats

    settings = _settings(args)
    return asyncio.run(
        stats.campaign(settings.require_database(), args.campaign, args.json, by=args.by,
                       since=args.since, until=args.until, tz=args.tz)
    )  # fmt: skip


def _cmd_rollups(args: argparse.Namespace) -> int:
    from commands import rollups
    from consumer import classify

    settings = _settings(args)
    # The verdicts are the consumer's, read from the same rules and egress file.
    classify.configure(settings.apple_egress_csv)
    return asyncio.run(rollups.run(settings.require_database(), args.campaign, args.reclassify,
                                   classify.classifier()))  # fmt: skip


def _cmd_forget(args: argparse.Namespace) -> int:
    from commands import forget

    return forget.run(_settings(args), args.recipient, args.campaign)


def _cmd_prune(args: argparse.Namespace) -> int:
    from commands import prune

    return prune.run(_settings(args), args.older_than)


def _cmd_events(args: argparse.Namespace) -> int:
    from commands import events

    settings = _settings(args)
    return asyncio.run(events.events(settings.require_database(), args.limit, args.tail))


def metric_makers() -> list[tuple[str, Callable[[Any], Any]]]:
    """What makes each process's metrics (given a registry), with the process serving
    them: the docs' metric table (``commands/reference.py``) is generated from these."""
    from consumer.metrics import ConsumerMetrics
    from ingest.metrics import IngestMetrics

    return [("ingest", IngestMetrics.create), ("consumer", ConsumerMetrics.create)]


def queue_metric_families() -> Sequence[Any]:
    """The queue metrics the consumer reads from beanstalkd at scrape time, empty."""
    from consumer.queue_metrics import families

    return families()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tlog.setup(args.log_level)
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
    except (SettingsError, KeyringError, LinkError, UpError) as exc:
        print(f"trackbuf {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `trackbuf events | head -1`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again, and exit 0
        # quietly, as head's other writers (cat, grep) do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A server that cannot be reached (no such host, refused, unreachable) is the
        # operator's to fix, not a bug: one line naming it, no traceback.
        print(f"trackbuf {args.command}: cannot reach a server it needs ({exc.strerror or exc}); "
              f"`trackbuf {args.command} --help` shows the addresses in use",
              file=sys.stderr)  # fmt: skip
        return 1
    return result
