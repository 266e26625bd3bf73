"""Dashboards, alert rules and the compose file, checked with real tools and real data.

No Grafana server or Docker engine runs here, so: every panel query goes to a real
Prometheus that scraped a real ingest and consumer; the rules are checked and
unit-tested by promtool and evaluated by that Prometheus; the compose file is checked
against the Compose specification schema and against the repository and settings.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.load import Load
from tests.procs import Process, start_ingest
from tests.servers import Beanstalkd, free_port, wait_port
from trackbuf.settings import ENV_PREFIX, Settings, field_types
from trackbuf.tokens import Keyring

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
METRIC = re.compile(r"\btrackbuf_[a-z0-9_]+")


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queries.append((panel["title"], target["expr"]))
    return queries


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
    names = set()
    for listen in (settings.listen, settings.metrics_listen):
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line and not line.startswith("#"):
                    names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def test_queries_and_rules_name_only_exported_metrics(live_stack: Settings) -> None:
    exported = scraped_names(live_stack)
    for source, expr in [*dashboard_queries(), *rule_exprs()]:
        for name in METRIC.findall(expr):
            assert name in exported, f"{source}: {name} is not exported by ingest or consumer"


@pytest.fixture
def prometheus(live_stack: Settings, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "install Debian's prometheus package"
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    targets = {"trackbuf-ingest": live_stack.listen, "trackbuf-consumer": live_stack.metrics_listen}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_port(port, timeout=30, proc=proc)  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_a_real_prometheus_answers_every_panel_and_evaluates_every_rule(
    live_stack: Settings, prometheus: str, keyring: Keyring
) -> None:
    base = f"http://{live_stack.listen}"
    forger = Keyring.parse("k1:someone-elses-secret-key")
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


# The compose file --------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose specification schema, as docker-compose 1.29.2 ships it."""
    cache = Path(tempfile.gettempdir()) / "trackbuf-compose-schema.json"
    if not cache.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                 "--disable-pip-version-check", "-d", tmp, "docker-compose==1.29.2"],
                check=True,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                cache.write_bytes(archive.read("compose/config/compose_spec.json"))
    schema: dict[str, Any] = json.loads(cache.read_text())
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
        "beanstalkd", "postgres", "migrate", "ingest", "consumer", "prometheus", "grafana",
    }  # fmt: skip


def test_compose_builds_and_mounts_what_exists(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
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
    # The beanstalkd binlog must be on a volume, or a container restart loses the queue.
    assert "-b" in dockerfile and any(
        v.endswith(":/var/lib/beanstalkd") for v in compose["services"]["beanstalkd"]["volumes"]
    )


def test_compose_ports_and_environment_match_the_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    known = {ENV_PREFIX + name.upper() for name in field_types()}
    for name, service in services.items():
        env = service.get("environment", {})
        for key in env if isinstance(env, dict) else []:
            if key.startswith(ENV_PREFIX):
                assert key in known, f"{name}: {key} is not a trackbuf setting"
    ingest_port = services["ingest"]["command"][-1].rsplit(":", 1)[1]
    assert f"{ingest_port}:{ingest_port}" in services["ingest"]["ports"]
    consumer_port = services["consumer"]["command"][-1].rsplit(":", 1)[1]
    env = services["consumer"]["environment"]
    assert env["TRACKBUF_BEANSTALKD"] == "beanstalkd:11300"
    assert env["TRACKBUF_DATABASE_URL"].split("@", 1)[1].startswith("postgres:5432/")
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"][0] for job in prom["scrape_configs"]
    }
    assert targets == {
        "trackbuf-ingest": f"ingest:{ingest_port}",
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
