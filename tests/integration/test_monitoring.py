"""Dashboards, alert rules and the compose file, checked with real tools and real data.

No Grafana server or Docker engine runs here, so: every panel query goes to a real
Prometheus that scraped a real ingest and consumer; the rules are checked and
unit-tested by promtool and evaluated by that Prometheus; the compose file is checked
against the Compose specification schema and against the repository and settings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from commands.main import build_parser
from loadtest.bench import scrape
from tests.load import Load
from tests.procs import Process, start_ingest
from tests.servers import Beanstalkd, free_port, wait_port
from trackbuf.settings import ENV_PREFIX, Settings, field_types
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = ROOT / "prometheus" / "alertmanager.yml"
# Dashboards on Prometheus; the campaign dashboard reads PostgreSQL (test_campaign_dashboard).
DASHBOARDS = sorted(
    path
    for path in (ROOT / "grafana" / "dashboards").glob("*.json")
    if '"trackbuf-prometheus"' in path.read_text()
)
METRIC = re.compile(r"\btrackbuf_[a-z0-9_]+")
# Grafana replaces $__rate_interval with max(4 x scrape interval, step + scrape
# interval); Prometheus does not know the variable. The live Prometheus below scrapes
# every second, so 5s holds at least four samples.
RATE_INTERVAL = "5s"


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for path in DASHBOARDS for panel in json.loads(path.read_text())["panels"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """Every panel query, as Grafana would send it to Prometheus."""
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)


def test_promtool_checks_config_rules_and_rule_unit_tests() -> None:
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        done = promtool(*args, cwd=ROOT / "prometheus")
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: wrap each panel query in one.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_json_is_importable() -> None:
    provisioning = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uids = {ds["uid"] for ds in provisioning["datasources"]}
    assert DASHBOARDS
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
        ids = [panel["id"] for panel in dash["panels"]]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] in uids
            assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])


# Units Grafana shows as a count per second; reqps only where requests are counted.
PER_SECOND = {"cps", "ops", "reqps"}
REQUEST_METRICS = ("trackbuf_ingest_requests_total", "trackbuf_ingest_http_errors_total")


def query_kind(expr: str) -> str:
    if "histogram_quantile(" in expr:
        return "quantile"
    if "increase(" in expr:
        return "increase"
    if re.search(r"\b(rate|irate|deriv)\(", expr):
        return "rate"
    return "gauge"


def test_dashboard_panels_keep_one_kind_and_unit_per_axis() -> None:
    for panel in dashboard_panels():
        title, defaults = panel["title"], panel["fieldConfig"]["defaults"]
        exprs = [target["expr"] for target in panel["targets"]]
        kinds = {query_kind(expr) for expr in exprs}
        # Rates next to an increase or a gauge share an axis and mean different things.
        assert len(kinds) == 1, f"{title}: mixes {sorted(kinds)}"
        assert "increase" not in kinds, f"{title}: plot rates; increase() depends on the window"
        for expr in exprs:
            windows = re.findall(r"\[([^\]]+)\]", expr)
            assert all(w == "$__rate_interval" for w in windows), f"{title}: fixed window {expr}"
        overrides = {
            o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
            for o in panel["fieldConfig"].get("overrides", [])
            if o["matcher"]["id"] == "byFrameRefID"
        }
        units = {}
        for target in panel["targets"]:
            own = overrides.get(target["refId"], {})
            unit, expr = own.get("unit", defaults["unit"]), target["expr"]
            units[target["refId"]] = unit
            if own.get("unit") and own["unit"] != defaults["unit"]:
                # A second unit needs an axis of its own, or one scale is meaningless.
                assert own.get("custom.axisPlacement") == "right", f"{title}: {expr}"
            if re.search(r"_bytes\b", expr):
                assert unit == "bytes", f"{title}: {expr} is in bytes, shown as {unit}"
            elif kinds == {"rate"}:
                assert unit in PER_SECOND, f"{title}: a rate shown as {unit}"
                if unit == "reqps":
                    assert any(m in expr for m in REQUEST_METRICS), f"{title}: not requests"
            elif kinds == {"quantile"} or re.search(r"_seconds\b", expr):
                assert unit == "s", f"{title}: seconds shown as {unit}"
            else:
                assert unit not in PER_SECOND, f"{title}: a gauge shown as a rate"
        assert len(set(units.values())) <= 2, f"{title}: {units}"


def aggregated(expr: str) -> Iterator[tuple[str, str]]:
    """(operator, argument) for every sum/avg/count/... in a PromQL expression."""
    pattern = re.compile(
        r"\b(sum|avg|count|min|max|group|stddev|stdvar|topk|bottomk|quantile)\s*"
        r"(?:(?:by|without)\s*\([^)]*\)\s*)?\("
    )
    for match in pattern.finditer(expr):
        depth, start = 1, match.end()
        for end in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            if depth == 0:
                yield match.group(1), expr[start:end]
                break


def test_queue_metrics_are_never_added_up_across_consumers() -> None:
    # trackbuf_queue_* are beanstalkd's own figures, exported alike by every consumer
    # process: summed, two consumers would show twice the backlog. The one sum allowed
    # is over the servers of a pool, of the max across consumers per server.
    raw = [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]
    for source, expr in [*raw, *rule_exprs()]:
        for op, argument in aggregated(expr):
            per_server = re.match(r"\s*max\s+by\s*\([^)]*\bserver\b", argument)
            if op == "sum" and per_server:
                continue
            if "trackbuf_queue_" in argument and op in ("sum", "avg", "count"):
                pytest.fail(f"{source}: {op} over queue metrics in {expr}")
    assert any("trackbuf_queue_" in expr for _, expr in raw)


@pytest.fixture
def live_stack(
    make_settings, beanstalkd: Beanstalkd, keyring: Keyring, tmp_path: Path
) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(threads=2)
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    consumer = Process(settings, "consume", log_path=tmp_path / "consumer.log")
    consumer.wait_http(f"http://{settings.metrics_listen}/healthz")
    try:
        yield settings
    finally:
        consumer.terminate()
        ingest.terminate()


def scraped_names(settings: Settings) -> set[str]:
    return {key.split("{", 1)[0] for listen in (settings.admin_listen, settings.metrics_listen)
            for key in scrape(listen)}  # fmt: skip


def test_queries_and_rules_name_only_exported_metrics(live_stack: Settings) -> None:
    exported = scraped_names(live_stack)
    for source, expr in [*dashboard_queries(), *rule_exprs()]:
        for name in METRIC.findall(expr):
            assert name in exported, f"{source}: {name} is not exported by ingest or consumer"


def alertmanager_binary() -> str | None:
    # Debian's prometheus-alertmanager names it prometheus-alertmanager; upstream, alertmanager.
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@contextlib.contextmanager
def server(cmd: list[str], port: int, log_path: Path) -> Iterator[str]:
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=30, proc=proc)  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str | None]:
    """The real Alertmanager with prometheus/alertmanager.yml, or None if not installed."""
    binary = alertmanager_binary()
    if binary is None:
        yield None
        return
    port = free_port()
    cmd = [binary, f"--config.file={ALERTMANAGER_CONFIG}",
           f"--storage.path={tmp_path / 'alertmanager'}",
           f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]  # fmt: skip
    with server(cmd, port, tmp_path / "alertmanager.log") as url:
        yield url


@pytest.fixture
def prometheus(live_stack: Settings, alertmanager: str | None, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "install Debian's prometheus package"
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    targets = {"trackbuf-ingest": live_stack.admin_listen,
               "trackbuf-consumer": live_stack.metrics_listen}  # fmt: skip
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    am_targets = [alertmanager.removeprefix("http://")] if alertmanager else []
    (am_config,) = config["alerting"]["alertmanagers"]
    am_config["static_configs"] = [{"targets": am_targets}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
           f"--storage.tsdb.path={tmp_path / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with server(cmd, port, tmp_path / "prometheus.log") as url:
        yield url


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def rule_states(prometheus: str) -> dict[str, str]:
    groups = api(prometheus, "rules")["groups"]
    return {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}


def wait_for_state(prometheus: str, alert: str, states: set[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (state := rule_states(prometheus)[alert]) not in states:
        assert time.monotonic() < deadline, f"{alert} stayed {state}, expected {states}"
        time.sleep(0.25)


def test_a_real_prometheus_answers_every_panel_and_evaluates_every_rule(
    live_stack: Settings,
    prometheus: str,
    alertmanager: str | None,
    beanstalkd: Beanstalkd,
    keyring: Keyring,
) -> None:
    base = f"http://{live_stack.listen}"
    forger = Keyring.parse("k1:someone-elses-secret-key-0123456789ab")
    Load(base, forger, "bad", count=5, rate=100).start().wait()
    deadline = time.monotonic() + 12
    load = Load(base, keyring, "prom", count=1200, rate=150).start()
    # Two scrapes at least inside every rate() window, with traffic flowing.
    time.sleep(6)
    missing: list[str] = []
    while True:
        missing = [
            f"{title}: {expr}"
            for title, expr in dashboard_queries()
            if not api(prometheus, "query", query=expr)["result"]
        ]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    load.wait()
    assert missing == [], "panels without data:\n" + "\n".join(missing)
    groups = api(prometheus, "rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(rule_exprs())
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    firing = {rule["name"] for rule in rules if rule["state"] != "inactive"}
    # A healthy stack under load: nothing lost, nothing stuck, nothing down.
    assert firing == set(), firing
    up = api(prometheus, "query", query="up")["result"]
    assert {r["metric"]["job"]: r["value"][1] for r in up} == {
        "trackbuf-ingest": "1",
        "trackbuf-consumer": "1",
    }

    # Now make the real rules fire on real data. A job that is not a trackbuf frame
    # becomes a dead letter at once; TrackbufDeadLetters has no `for`, so it fires.
    with beanstalkd.client() as client:
        client.put(b"not a trackbuf job")
    wait_for_state(prometheus, "TrackbufDeadLetters", {"firing"})
    # beanstalkd down: seen by the consumer's next scrape, pending for its `for: 1m`.
    beanstalkd.stop()
    wait_for_state(prometheus, "TrackbufBeanstalkdDown", {"pending", "firing"})

    if alertmanager is None:
        pytest.skip(
            "Alertmanager not installed (apt-get install prometheus-alertmanager): "
            "everything above passed; delivery to Alertmanager not checked"
        )
    # Prometheus sent the firing alert to Alertmanager (prometheus.yml's alerting),
    # whose routes (alertmanager.yml) hand a warning to the warning receiver.
    deadline = time.monotonic() + 15
    while True:
        url = f"{alertmanager}/api/v2/alerts?filter=alertname%3D%22TrackbufDeadLetters%22"
        with urllib.request.urlopen(url, timeout=5) as response:
            received = json.loads(response.read())
        if received or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert [alert["labels"]["severity"] for alert in received] == ["warning"], received
    assert [r["name"] for r in received[0]["receivers"]] == ["warning"]


def test_alertmanager_config_is_valid_and_routes_by_severity() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (apt-get install prometheus-alertmanager)")
    done = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Every severity alerts.yml uses reaches a receiver of its own.
    severities = {
        rule["labels"]["severity"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    assert severities == {"page", "warning"}
    for severity in severities:
        done = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
             "alertname=TrackbufTest", f"severity={severity}"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.split() == [severity], done.stdout


# The compose file --------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose specification schema as docker-compose 1.29.2 ships it, vendored in
    tests/data (source and checksum in tests/data/README.md) so no test needs a network."""
    schema: dict[str, Any] = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_compose_file_follows_the_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    schema.pop("id", None)  # a relative id would make jsonschema resolve refs by URL
    jsonschema.Draft7Validator(schema).validate(compose)
    assert set(compose["services"]) == {
        "beanstalkd-1", "beanstalkd-2", "beanstalkd-3", "postgres", "migrate", "ingest",
        "consumer", "prometheus", "alertmanager", "grafana",
    }  # fmt: skip


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Each build stage's ENTRYPOINT and CMD (exec form, as JSON arrays)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            match = re.fullmatch(r"\S+\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert match, f"name every stage: {line}"
            current = stages[match.group(1)] = {}
        elif word.upper() in ("ENTRYPOINT", "CMD") and current is not None:
            # Shell form would hide the real argv behind sh -c: exec form only.
            current[word.upper()] = json.loads(rest)
    return stages


def argv(service: dict[str, Any], stages: dict[str, dict[str, Any]]) -> list[str]:
    """The command line a compose service runs: entrypoint plus command, each from the
    service or else from its image's Dockerfile stage."""
    stage = stages[service["build"]["target"]]
    entrypoint = service.get("entrypoint", stage.get("ENTRYPOINT", []))
    command = service.get("command", stage.get("CMD", []))
    return [*entrypoint, *command]


def volume_targets(service: dict[str, Any]) -> set[str]:
    return {volume.split(":")[1] for volume in service.get("volumes", [])}


def test_compose_builds_and_mounts_what_exists(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages()
    for line in re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE):
        assert (ROOT / line).exists(), f"Dockerfile copies {line}, which does not exist"
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, name
        else:
            assert re.fullmatch(r"[a-z/]+:v?[0-9][\w.]*", service["image"]), f"{name}: pin a tag"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_compose_beanstalkd_keeps_its_binlog_on_a_volume_and_fsyncs(
    compose: dict[str, Any],
) -> None:
    pool = {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("target") == "beanstalkd"
    }
    assert len(pool) == 3, sorted(pool)
    addresses, volumes = [], set()
    for name, service in pool.items():
        command = argv(service, dockerfile_stages())
        assert command[0] == "beanstalkd", command
        # beanstalkd 1.12's options; an unknown one fails here rather than at start.
        parser = argparse.ArgumentParser(prog="beanstalkd", add_help=False)
        for flag in ("-b", "-f", "-l", "-p", "-s", "-u", "-z"):
            parser.add_argument(flag)
        for flag in ("-F", "-c", "-n", "-V", "-v", "-h"):
            parser.add_argument(flag, action="store_true")
        with contextlib.redirect_stderr(io.StringIO()):
            parsed, unknown = parser.parse_known_args(command[1:])
        assert unknown == [], f"beanstalkd does not take {unknown}"
        # Without -b on a volume, a container restart loses every queued event; without
        # -f 0, a power loss loses the last ~50 ms of acknowledged ones.
        assert parsed.b in volume_targets(service), f"{name}: binlog {parsed.b} not on a volume"
        assert parsed.f == "0" and not parsed.F, command
        assert parsed.p == "11300" and parsed.l == "0.0.0.0"
        addresses.append(f"{name}:{parsed.p}")
        # Two servers on one binlog directory would corrupt each other's files.
        volumes |= {v.split(":")[0] for v in service["volumes"] if v.endswith(f":{parsed.b}")}
    assert len(volumes) == len(pool), volumes
    for user in ("ingest", "consumer"):
        listed = compose["services"][user]["environment"]["TRACKBUF_BEANSTALKD"].split(",")
        assert sorted(listed) == sorted(addresses), user
        assert set(compose["services"][user]["depends_on"]) >= set(pool), user


def trackbuf_commands(compose: dict[str, Any]) -> dict[str, argparse.Namespace]:
    """Every trackbuf command line in the compose file, parsed by trackbuf's own CLI."""
    stages = dockerfile_stages()
    parsed = {}
    for name, service in compose["services"].items():
        if service.get("build", {}).get("target") != "app":
            continue
        command = argv(service, stages)
        assert command[0] == "trackbuf", command
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parsed[name] = build_parser().parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{name}: trackbuf rejects {command[1:]}: {errors.getvalue()}")
    return parsed


def test_compose_ports_and_environment_match_the_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    known = {ENV_PREFIX + name.upper() for name in field_types()}
    for name, service in services.items():
        env = service.get("environment", {})
        for key in env if isinstance(env, dict) else []:
            if key.startswith(ENV_PREFIX):
                assert key in known, f"{name}: {key} is not a trackbuf setting"
    commands = trackbuf_commands(compose)
    assert {name: args.command for name, args in commands.items()} == {
        "migrate": "migrate", "ingest": "ingest", "consumer": "consume",
    }  # fmt: skip
    ingest_port = commands["ingest"].listen.rsplit(":", 1)[1]
    assert commands["ingest"].listen.startswith("0.0.0.0:"), "reachable from other containers"
    assert f"{ingest_port}:{ingest_port}" in services["ingest"]["ports"]
    # /metrics on the admin address: reachable by Prometheus, never published.
    assert commands["ingest"].admin_listen.startswith("0.0.0.0:")
    admin_port = commands["ingest"].admin_listen.rsplit(":", 1)[1]
    assert not any(admin_port in str(port) for port in services["ingest"]["ports"])
    assert commands["consumer"].metrics_listen.startswith("0.0.0.0:")
    consumer_port = commands["consumer"].metrics_listen.rsplit(":", 1)[1]
    env = services["consumer"]["environment"]
    assert env["TRACKBUF_DATABASE_URL"].split("@", 1)[1].startswith("postgres:5432/")
    # The spool must outlive the container: it holds acknowledged events.
    spool_dir = services["ingest"]["environment"]["TRACKBUF_SPOOL_DIR"]
    assert any(spool_dir.startswith(target) for target in volume_targets(services["ingest"]))
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"][0] for job in prom["scrape_configs"]
    }
    assert targets == {
        "trackbuf-ingest": f"ingest:{admin_port}",
        "trackbuf-consumer": f"consumer:{consumer_port}",
    }
    datasource = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/trackbuf.yml").read_text())
    assert any(
        v.endswith(":" + provider["providers"][0]["options"]["path"] + ":ro")
        for v in services["grafana"]["volumes"]
    )


def test_compose_alertmanager_gets_prometheus_alerts_and_its_config(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["alertmanager"]
    flags = dict(arg.split("=", 1) for arg in service["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts[flags["--config.file"]] == "./prometheus/alertmanager.yml"
    assert mounts[flags["--storage.path"]] in compose["volumes"]  # silences survive
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    (alertmanagers,) = prom["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert "9093:9093" in service["ports"]
    assert "alertmanager" in compose["services"]["prometheus"]["depends_on"]
