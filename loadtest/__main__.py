"""``python -m loadtest``: generate traffic, or run the benchmarks.

python -m loadtest generate --url http://127.0.0.1:8080 --profile spike --rate 500 --duration 30
python -m loadtest urls --count 20000 --mix mixed > urls.txt   # for loadtest/wrk/urls.lua
python -m loadtest bench [--quick] [--only ingest,drain,...] [--out loadtest/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from loadtest import report
from loadtest.bench import SECTIONS, Plan
from loadtest.traffic import PROFILES, URL_MIXES, drive, wrk_paths
from trackbuf.tokens import Keyring, KeyringError

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="send realistic traffic to a running ingest")
    gen.add_argument(
        "--url", default=f"http://{os.environ.get('TRACKBUF_LISTEN', '127.0.0.1:8080')}"
    )
    gen.add_argument("--profile", choices=PROFILES, default="steady")
    gen.add_argument("--rate", type=float, default=500, help="requests/s (base rate)")
    gen.add_argument("--duration", type=float, default=10, help="seconds (upper bound)")
    gen.add_argument("--max-requests", type=int, default=100_000, help="count (upper bound)")
    gen.add_argument("--concurrency", type=int, default=64)
    gen.add_argument("--run", default=f"gen{int(time.time())}", help="prefix of recipients")
    gen.add_argument("--acked", type=Path, help="write acknowledged recipients here")
    urls = sub.add_parser("urls", help="print signed URL paths for loadtest/wrk/urls.lua")
    urls.add_argument("--count", type=int, default=20_000)
    urls.add_argument("--mix", choices=URL_MIXES, default="mixed")
    bench = sub.add_parser("bench", help="run the benchmarks and write results")
    bench.add_argument("--quick", action="store_true", help="tiny counts, seconds")
    bench.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    bench.add_argument("--out", type=Path, default=REPO / "benchmarks")
    bench.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "urls":
        try:
            keys = Keyring.parse(os.environ.get("TRACKBUF_SIGNING_KEYS", ""))
        except KeyringError as exc:  # the ingest under test must verify what we sign
            print(f"python -m loadtest urls: {exc}", file=sys.stderr)
            return 2
        sys.stdout.writelines(path + "\n" for path in wrk_paths(keys, args.count, args.mix))
        return 0
    return _bench(args)


def _generate(args: argparse.Namespace) -> int:
    keys = os.environ.get("TRACKBUF_SIGNING_KEYS", "")
    result = asyncio.run(
        drive(args.url, Keyring.parse(keys), args.run, args.profile, args.rate, args.duration,
              args.max_requests, args.concurrency)
    )  # fmt: skip
    if args.acked:
        args.acked.write_text("\n".join(result.acked) + "\n")
    print(json.dumps(result.summary()))
    return 0 if result.failed == 0 else 1


def _bench(args: argparse.Namespace) -> int:
    plan = Plan.quick() if args.quick else Plan()
    args.out.mkdir(parents=True, exist_ok=True)
    # Sections not run now keep their last results, so one section can be re-measured.
    previous = args.out / "results.json"
    results: dict[str, object] = json.loads(previous.read_text()) if previous.exists() else {}
    results.update(plan=plan.__dict__, quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="trackbuf-bench-") as tmp:
        for name in args.only.split(","):
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            results[name] = SECTIONS[name](Path(tmp) / name, plan)
            print(f"bench: {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr)
            report.write_json(results, args.out)  # keep what finished if a later one fails
    report.charts(results, args.out)
    command = "python -m loadtest bench" + (" --quick" if args.quick else "")
    report.update_markdown(args.markdown, results, command)
    print(json.dumps({k: v for k, v in results.items() if k != "spike"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
