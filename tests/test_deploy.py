"""The deployment files under deploy/ are valid, and say what docs/OPERATIONS.md says.

- systemd units: `systemd-analyze verify` (with the trackbuf executable pointed at this
  checkout's), plus what the docs promise of them: stop timeouts longer than the
  shutdown timeout, the spool and data dir on persistent state, beanstalkd's binlog,
  migrate as a oneshot the consumer waits for.
- Kubernetes manifests: every object against the official schema (kubernetes-validate
  ships them, so this runs offline), strict (an unknown or misspelt field fails), plus
  probes, grace periods, one spool volume per ingest and the binlog on a volume.
- The container commands in both name trackbuf commands and flags that exist.
The nginx config is run for real in tests/integration/test_proxy.py.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from commands import reference
from ingest.server import STOP_GRACE_S
from ingest.supervisor import EXIT_MARGIN_S
from trackbuf.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES = ROOT / "deploy" / "kubernetes"
UNITS = ("trackbuf-ingest", "trackbuf-consume", "trackbuf-migrate", "trackbuf-beanstalkd")
INSTALLED = "/opt/trackbuf/bin/trackbuf"
KUBERNETES_VERSION = "1.30"
# What the shipped examples set (deploy/systemd/trackbuf.env, the ConfigMap).
SHUTDOWN_TIMEOUT = 10.0
# Ingest's last worker is killed this long after SIGTERM; nothing may kill it sooner.
INGEST_STOP = SHUTDOWN_TIMEOUT + STOP_GRACE_S + EXIT_MARGIN_S


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string((SYSTEMD / f"{name}.service").read_text())
    return parser


def service_env(name: str) -> dict[str, str]:
    """The unit's Environment= lines (configparser keeps only the last of a repeated
    key, so they are read from the text)."""
    out = {}
    for line in (SYSTEMD / f"{name}.service").read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            out[key] = value
    return out


def env_file() -> dict[str, str]:
    out = {}
    for line in (SYSTEMD / "trackbuf.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def seconds(value: str) -> float:
    assert value.isdigit(), f"write stop timeouts in plain seconds, got {value!r}"
    return float(value)


def check_command(args: list[str]) -> None:
    """``args`` (after the trackbuf executable) name a command and flags it has."""
    by_path = {c.path: c for c in reference.commands()}
    words = [a for a in args if not a.startswith("-")]
    path = next((" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in by_path), None)
    assert path is not None, f"no trackbuf command in {args}"
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert flag in by_path[path].spellings, f"trackbuf {path} has no flag {flag}"


def test_the_examples_use_the_default_shutdown_timeout() -> None:
    # The timeouts below are checked against this value; the files must agree.
    assert Settings().shutdown_timeout == SHUTDOWN_TIMEOUT
    assert float(env_file()["TRACKBUF_SHUTDOWN_TIMEOUT"]) == SHUTDOWN_TIMEOUT
    assert float(configmap()["data"]["TRACKBUF_SHUTDOWN_TIMEOUT"]) == SHUTDOWN_TIMEOUT


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # Where the units expect the installed trackbuf, use this checkout's: verify checks
    # that every command exists and is executable.
    here = Path(sys.executable).parent / "trackbuf"
    assert here.exists()
    for name in UNITS:
        text = (SYSTEMD / f"{name}.service").read_text().replace(INSTALLED, str(here))
        (tmp_path / f"{name}.service").write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / f"{n}.service") for n in UNITS)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    # It exits 0 on unknown keys and bad values, warning on stderr: any output fails.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_units_stop_gracefully_and_keep_their_state_on_disk() -> None:
    ingest, consume = unit("trackbuf-ingest"), unit("trackbuf-consume")
    assert seconds(ingest["Service"]["TimeoutStopSec"]) > INGEST_STOP
    assert seconds(consume["Service"]["TimeoutStopSec"]) > SHUTDOWN_TIMEOUT + STOP_GRACE_S
    for parsed in (ingest, consume):
        # SIGTERM to the main process only: the ingest supervisor stops its workers.
        assert parsed["Service"]["KillMode"] == "mixed"
        assert parsed["Service"]["ExecStart"].startswith(INSTALLED + " ")
        assert parsed["Service"]["EnvironmentFile"] == "/etc/trackbuf/trackbuf.env"
    # The spool and the data dir are set explicitly, under the unit's StateDirectory
    # (/var/lib/<name>, kept across restarts and upgrades), never the working directory.
    state = "/var/lib/" + ingest["Service"]["StateDirectory"]
    env = service_env("trackbuf-ingest")
    assert env["TRACKBUF_DATA_DIR"] == state
    assert env["TRACKBUF_SPOOL_DIR"].startswith(state + "/")
    assert ingest["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"  # key rotation


def test_the_consumer_starts_after_migrate_and_beanstalkd_keeps_a_binlog() -> None:
    consume, migrate = unit("trackbuf-consume"), unit("trackbuf-migrate")
    assert "trackbuf-migrate.service" in consume["Unit"]["Requires"].split()
    assert "trackbuf-migrate.service" in consume["Unit"]["After"].split()
    assert migrate["Service"]["Type"] == "oneshot"
    assert migrate["Service"]["RemainAfterExit"] == "yes"
    beanstalkd = unit("trackbuf-beanstalkd")["Service"]
    words = beanstalkd["ExecStart"].split()
    binlog = words[words.index("-b") + 1]
    assert binlog == "/var/lib/" + beanstalkd["StateDirectory"]
    assert words[words.index("-f") + 1] == "0"
    for name in UNITS[:3]:
        check_command(unit(name)["Service"]["ExecStart"].split()[1:])


def test_the_env_file_sets_no_secret_inline_and_names_the_key_file() -> None:
    env = env_file()
    assert "TRACKBUF_SIGNING_KEYS" not in env  # one key file, the same on every host
    assert env["TRACKBUF_SIGNING_KEYS_FILE"].startswith("/etc/trackbuf/")
    assert "$(" not in (SYSTEMD / "trackbuf.env").read_text()


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def configmap() -> dict[str, Any]:
    return find("ConfigMap", "trackbuf-settings")


def test_every_manifest_matches_the_kubernetes_schema() -> None:
    import kubernetes_validate

    docs = manifests()
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service", "ConfigMap"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_schema_check_sees_a_misspelt_field() -> None:
    import kubernetes_validate

    bad = find("StatefulSet", "trackbuf-ingest")
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(kind, name)["spec"]["template"]["spec"]
    return spec


def test_ingest_probes_grace_and_one_spool_volume_per_pod() -> None:
    ingest = find("StatefulSet", "trackbuf-ingest")
    spec = pod("StatefulSet", "trackbuf-ingest")
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pause + INGEST_STOP
    # The spool: a volume claim per pod (volumeClaimTemplates), mounted where
    # TRACKBUF_SPOOL_DIR points.
    claims = {c["metadata"]["name"] for c in ingest["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    spool = configmap()["data"]["TRACKBUF_SPOOL_DIR"]
    assert mounts[spool] in claims
    # The data dir (the workers' metrics files) is writable too: a volume of its own,
    # since the pod does not run as the image's user.
    data = configmap()["data"]["TRACKBUF_DATA_DIR"]
    assert data in mounts and spool.startswith(data + "/")
    check_command(container["args"])


def test_the_consumer_migrates_first_and_beanstalkd_keeps_its_binlog_on_a_volume() -> None:
    spec = pod("Deployment", "trackbuf-consumer")
    assert find("Deployment", "trackbuf-consumer")["spec"]["strategy"]["type"] == "Recreate"
    (init,) = spec["initContainers"]
    assert init["args"] == ["migrate"]
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT + STOP_GRACE_S
    check_command(container["args"])

    beanstalkd = find("StatefulSet", "trackbuf-beanstalkd")
    (server,) = pod("StatefulSet", "trackbuf-beanstalkd")["containers"]
    assert server["args"] == ["-f", "0"]
    # The image's entrypoint passes -b /var/lib/beanstalkd (Dockerfile).
    assert '"-b", "/var/lib/beanstalkd"' in (ROOT / "Dockerfile").read_text()
    claims = {c["metadata"]["name"] for c in beanstalkd["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert mounts["/var/lib/beanstalkd"] in claims
    # TRACKBUF_BEANSTALKD lists every pod of the StatefulSet by its stable name.
    servers = configmap()["data"]["TRACKBUF_BEANSTALKD"].split(",")
    replicas = beanstalkd["spec"]["replicas"]
    service = beanstalkd["spec"]["serviceName"]
    assert servers == [f"trackbuf-beanstalkd-{i}.{service}:11300" for i in range(replicas)]
