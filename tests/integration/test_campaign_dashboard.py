"""The campaign dashboard: every panel's SQL, as Grafana sends it, run against a real
PostgreSQL holding real rollups, returns the shape its panel draws."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_pipeline import drain, rows
from tests.integration.test_rollups import put
from tests.integration.test_stats import EVENTS, NEW, OTHER, SALE
from tests.servers import Beanstalkd
from trackbuf import codec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "campaigns.json"
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "postgres.yml"
# The dashboard's time range while the test runs it: both days of test_stats.EVENTS.
FROM, TO = "2026-11-30T00:00:00Z", "2026-12-03T00:00:00Z"


def grafana_sql(sql: str, campaign: str) -> str:
    """Expand the macros and variables the way Grafana's PostgreSQL data source does."""
    sql = sql.replace("${campaign:sqlstring}", "'" + campaign.replace("'", "''") + "'")
    sql = re.sub(r"\$__timeFilter\(([^()]*(?:\([^()]*\))?[^()]*)\)",
                 lambda m: f"{m.group(1)} BETWEEN '{FROM}' AND '{TO}'", sql)  # fmt: skip
    assert "$" not in sql, f"unexpanded macro or variable in {sql}"
    return sql


def panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def run(dsn: str, panel: dict[str, Any], campaign: str = "spring") -> list[Any]:
    (target,) = panel["targets"]
    return rows(dsn, grafana_sql(target["rawSql"], campaign))


@pytest.fixture
def dsn(make_settings, beanstalkd: Beanstalkd) -> str:  # type: ignore[no-untyped-def]
    settings = make_settings()
    put(beanstalkd, [codec.encode_job([codec.encode_event(e) for e in [*EVENTS, OTHER]])])
    assert drain(settings) == 0
    return str(settings.database_url)


def test_the_dashboard_uses_the_provisioned_postgresql_datasource() -> None:
    (source,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert source["type"] == "grafana-postgresql-datasource"
    assert source["url"] == "postgres:5432" and source["jsonData"]["database"] == "trackbuf"
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 30
    (variable,) = dash["templating"]["list"]
    used = [variable["datasource"], *(p["datasource"] for p in dash["panels"]),
            *(t["datasource"] for p in dash["panels"] for t in p["targets"])]  # fmt: skip
    assert all(d == {"type": source["type"], "uid": source["uid"]} for d in used)


def test_the_campaign_variable_lists_campaigns(dsn: str) -> None:
    (variable,) = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert [r[0] for r in rows(dsn, variable["query"])] == ["autumn", "spring"]


def test_every_panel_query_returns_what_its_panel_draws(dsn: str) -> None:
    for panel in panels():
        (target,) = panel["targets"]
        result = run(dsn, panel)
        assert result, f"{panel['title']}: no rows"
        columns = list(result[0].keys())
        if target["format"] == "time_series":
            # Grafana wants a "time" column, ascending, then numbers (or one text
            # "metric" column naming the series, in the long format).
            assert columns[0] == "time", panel["title"]
            times = [r["time"] for r in result]
            assert all(isinstance(t, datetime) for t in times) and times == sorted(times)
            for row in result:
                for name in columns[1:]:
                    if name == "metric":
                        assert isinstance(row[name], str)
                    else:
                        assert row[name] is None or isinstance(row[name], int | float)
        else:
            assert target["format"] == "table"
        # No panel leaks another campaign's rows.
        assert all("autumn" not in str(value) for r in result for value in r.values())


def test_panel_figures_match_the_report(dsn: str) -> None:
    by_title = {p["title"]: p for p in panels()}
    people = {r["kind"]: r["human_unique_recipients"] for r in run(dsn, by_title["Unique people"])}
    assert people == {"open": 4, "click": 2}
    (rate,) = run(dsn, by_title["Click-to-open rate"])
    assert rate["click_to_open"] == 0.5
    (share,) = run(dsn, by_title["Proxied and machine share of opens"])
    assert share["proxied_share"] == pytest.approx(1 / 7)  # bob's Gmail open: a person's
    assert share["machine_share"] == pytest.approx(1 / 7)
    links = run(dsn, by_title["Top links"])
    assert [(r["url"], r["unique people"]) for r in links] == [(SALE, 2), (NEW, 1)]
    clients = run(dsn, by_title["Mail clients (people's opens)"])
    assert [(r["client"], r["opens"]) for r in clients] == [
        ("Mobile Safari UI/WKWebView", 4), ("Outlook", 1)]  # fmt: skip
    hourly = run(dsn, by_title["Opens and clicks per hour, people and machines"])
    assert sum(r["human opens"] or 0 for r in hourly) == 6
    assert sum(r["machine opens"] or 0 for r in hourly) == 1
    reasons = run(dsn, by_title["Machine events by reason"])
    assert {r["metric"] for r in reasons} == {"apple_mpp", "bot"}
    days = run(dsn, by_title["New unique people per day (UTC)"])
    assert [r["new openers"] for r in days] == [3, 1]
