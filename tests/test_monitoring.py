"""docs/monitoring/: every metric the Grafana dashboard and the Prometheus alert rules name is one
a real broker exports on its admin listener's /metrics; the rules cover quarantine, dead
letters, lag, leak-guard blocks and the SET backlog."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.app import create_app
from broker.config import Config, DatabaseConfig, HomeConfig, PropagationConfig, ServerConfig
from tests.scim_support import _free_port

MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
METRIC = re.compile(r"\b(broker_[a-z0-9_]+)\b")
PROMQL_LABEL = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)|\{([^}]*)\}")


def _rules() -> list[dict[str, object]]:
    document = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _exprs() -> list[str]:
    return [str(rule["expr"]) for rule in _rules()] + _dashboard_exprs()


@pytest.fixture
async def scrape(db_url: str) -> AsyncIterator[str]:
    """The admin listener's /metrics of a broker with a push peer and a request served."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO domains (id, kind, push, scim_url) VALUES ('P1', 'peer', true, 'http://p1')"
        )
    finally:
        await conn.close()
    admin_port = _free_port()
    config = Config(
        server=ServerConfig(admin_port=admin_port),
        database=DatabaseConfig(url=db_url),
        home=HomeConfig(scim_url="http://127.0.0.1:9/scim/v2"),
        propagation=PropagationConfig(enabled=False),
    )
    async with TestClient(TestServer(create_app(config))) as client:
        await client.get("/healthz")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{admin_port}/metrics") as got,
        ):
            assert got.status == 200
            yield await got.text()


def _exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Every name a query may use (samples, and a labelled family's names before its first
    sample), and the labels each carries."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    for line in text.splitlines():
        if line.startswith("# HELP "):
            names.add(line.split()[2])
    return names, labels


def test_the_rules_cover_what_an_operator_must_hear_about() -> None:
    alerts = {str(rule["alert"]): str(rule["expr"]) for rule in _rules()}
    for alert, metric in {
        "BrokerPeerQuarantined": "broker_peer_quarantined",
        "BrokerDeadLetters": "broker_outbox_dead_letters",
        "BrokerDeliveryLag": "broker_outbox_oldest_age_seconds",
        "BrokerLeakGuardBlocked": "broker_leak_guard_blocks_total",
        "BrokerSetBacklog": "broker_security_events",
    }.items():
        assert metric in alerts[alert], alert
    assert all(rule.get("annotations") for rule in _rules())


async def test_every_metric_the_dashboard_and_the_rules_name_is_exported(scrape: str) -> None:
    exported, _labels = _exported(scrape)
    named = {name for expr in _exprs() for name in METRIC.findall(expr)}
    assert len(named) >= 9, named
    assert named - exported == set(), f"not exported: {sorted(named - exported)}"


async def test_the_labels_they_group_and_filter_by_exist_on_the_series(scrape: str) -> None:
    _exported_names, labels = _exported(scrape)
    known = set().union(*labels.values()) | {"le"}
    # Labels of a labelled family with no sample yet (deliveries, leak guard) are in their HELP.
    known |= {"domain", "outcome"}
    used: set[str] = set()
    for expr in _exprs():
        for by, matchers in PROMQL_LABEL.findall(expr):
            used.update(part.strip() for part in by.split(",") if part.strip())
            used.update(re.findall(r"(\w+)\s*[=!~]", matchers))
    assert used - known == set(), f"no series carries: {sorted(used - known)}"
    assert {"domain", "state"} <= used
