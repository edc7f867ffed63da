"""deploy/prometheus and deploy/grafana: valid for promtool, alerts unit-tested, names real."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.queue_exporter import make_registry
from tasks.cli.local_redis import LocalRedis
from tasks.settings import Settings
from workers.metrics import Metrics

from .conftest import ROOT
from .scrape import promtool

PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ttspool.json"
_NAME = re.compile(r"\bttspool_[a-z_]+\b")


def _ok(*args: str) -> str:
    res = promtool(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_config_and_rules_are_valid() -> None:
    out = _ok("check", "config", str(PROM / "prometheus.yml"))
    assert "1 rule files found" in out
    _ok("check", "rules", str(PROM / "alerts.yml"))


def test_every_alert_has_passing_unit_tests() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)", (PROM / "alerts.yml").read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    assert len(alerts) >= 5 and alerts == tested
    assert "SUCCESS" in _ok("test", "rules", str(PROM / "alerts_test.yml"))


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool checks PromQL inside rule files, so each panel query becomes a rule.
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(_dashboard_exprs()):
        rules += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr.replace('$__rate_interval', '5m'))}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(rules) + "\n")
    _ok("check", "rules", str(path))


def test_dashboard_and_alerts_use_only_exported_names() -> None:
    known: set[str] = set()
    with LocalRedis() as broker:
        registries = [Metrics().registry, make_registry(Settings(broker_url=broker.url))]
        for registry in registries:
            for family in registry.collect():
                known |= {s.name for s in family.samples}
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
                known |= {family.name + s for s in suffixes.get(family.type, ())}
    # GPU families only exist on a CUDA worker; take their names from the collectors.
    known |= set(re.findall(r'"(ttspool_gpu_[a-z_]+)"', (ROOT / "workers" / "metrics.py").read_text()))
    used = set(_NAME.findall(" ".join(_dashboard_exprs()) + (PROM / "alerts.yml").read_text()))
    assert used and used <= known, used - known
    for name in ("ttspool_queue_depth", "ttspool_audio_seconds_total", "ttspool_steps_total",
                 "ttspool_batch_size_bucket", "ttspool_job_latency_seconds_bucket", "ttspool_gpu_utilization_ratio"):
        assert name in used, name


def test_grafana_provisioning_points_at_the_dashboard_datasource() -> None:
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    uid = re.search(r"uid: (\S+)", datasource)
    assert uid is not None
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {uid.group(1)}
    assert "path: /var/lib/grafana/dashboards" in (GRAFANA / "provisioning" / "dashboards" / "ttspool.yaml").read_text()
