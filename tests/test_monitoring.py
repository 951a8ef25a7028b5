"""deploy/prometheus, deploy/grafana and the compose `monitoring` profile, checked against the
metrics a real acceptor exports; the alert rules' unit tests run in promtool when installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
_METRIC = re.compile(r"\b(ingest_[a-z0-9_]+)")
# Prometheus's own series, which the rules may name too.
_PROMETHEUS_OWN = {"up"}


@pytest.fixture
def exported(acceptor: Any) -> set[str]:
    """Every series name a real acceptor's /metrics has, after a delivery and a refusal."""
    httpx.post(f"{acceptor.url}/webhooks/outreach", content=b"{}",
               headers={"Outreach-Webhook-Signature": "0" * 64})
    text = httpx.get(f"{acceptor.url}/metrics", timeout=10).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_alert_rules_cover_what_operators_need() -> None:
    names = {rule["alert"] for rule in _alert_rules()}
    assert names == {"IngestProviderSilent", "IngestRefusalRatioHigh", "IngestDeadLettersGrowing",
                     "IngestOldestJobTooOld", "IngestSpoolNotEmpty", "IngestQueueWithoutWorker",
                     "IngestAcceptorDown", "IngestConnectionLimitReached",
                     "IngestSubscriptionUnhealthy"}
    for rule in _alert_rules():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_alert_rules_name_only_exported_metrics(exported: set[str]) -> None:
    for rule in _alert_rules():
        used = set(_METRIC.findall(rule["expr"]))
        assert used or any(f"{own}{{" in rule["expr"] for own in _PROMETHEUS_OWN), rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)


def test_every_dashboard_query_names_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "webhook-ingest.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) == len(dashboard["panels"]) >= 10
    for expr in exprs:
        used = set(_METRIC.findall(expr))
        assert used or any(f"{own}{{" in expr for own in _PROMETHEUS_OWN), expr
        assert used <= exported, (expr, used - exported)


def test_promtool_runs_the_alert_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run "
                    "installs it)")
    for config in ("alerts.yml",):
        check = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / config)],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run([promtool, "test", "rules", "alerts.test.yml"],
                            cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_monitoring_profile_runs_prometheus_and_alertmanager_pinned() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    monitoring = {name: s for name, s in services.items()
                  if "monitoring" in (s.get("profiles") or [])}
    assert set(monitoring) == {"prometheus", "alertmanager"}
    for name, service in monitoring.items():
        image = service["image"]
        assert re.fullmatch(r"prom/[a-z]+:v\d+\.\d+\.\d+", image), (name, image)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), (name, source)
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", [])), name
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert "webhook-ingest" in jobs  # the job IngestAcceptorDown watches
    alertmanager = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in alertmanager["receivers"]}
    assert receivers[alertmanager["route"]["receiver"]]["slack_configs"]
    assert orjson.dumps(alertmanager).decode().count("hooks.slack.com") == 0  # no real URL
