"""`ttspool doctor`: can this machine serve? One line per check, each with its fix.

Every check talks to the real thing (imports in a child process, a Redis PING and INFO,
a probe object written, read back and deleted, the model files hashed) rather than
inspecting configuration alone. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any, Callable

from packaging.utils import canonicalize_name

from ..schema import MAX_STEPS
from ..errors import SettingsError
from ..settings import Settings, redact_url
from .common import REDIS_FIX

# The lock sits next to the source tree (a checkout, or /src in the image, both installed
# in place); a wheel installed elsewhere has none, and versions then go unchecked.
LOCK = Path(__file__).resolve().parents[2] / "uv.lock"
REINSTALL = "bash deploy/bootstrap.sh worker (or: uv sync --locked --extra worker)"

# Upper bounds for one GPT step of a full batch, for the visibility-timeout check. CPU:
# a 32-row step of random-full measured 0.16-0.17 s here (docs/PERF.md); a GPU step is
# several times shorter. Deliberately generous: the check is for gross contradictions.
_STEP_S = {"cpu": 0.25, "cuda": 0.05}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<5} {self.name:<13} {self.detail}"
        return f"{text} -- fix: {self.fix}" if self.fix else text


Probe = dict[str, Any]


def check_python() -> Check:
    v = sys.version_info
    version = f"{v.major}.{v.minor}.{v.micro}"
    if (v.major, v.minor) != (3, 11):
        return Check("python", "fail", f"{version} at {sys.executable}; ttspool needs 3.11",
                     "install Python 3.11 and rerun bootstrap with PYTHON=/path/to/python3.11")
    return Check("python", "ok", f"{version} at {sys.executable}")


def locked_versions(lock: Path) -> dict[str, set[str]]:
    """Package -> versions uv.lock allows (one per platform fork, usually just one)."""
    out: dict[str, set[str]] = {}
    for pkg in tomllib.loads(lock.read_text()).get("package", []):
        if "version" in pkg:
            out.setdefault(canonicalize_name(pkg["name"]), set()).add(pkg["version"])
    return out


def check_packages(lock: Path = LOCK) -> Check:
    if not lock.is_file():
        return Check("packages", "warn", f"no lock at {lock} (installed as a wheel?): versions not checked")
    wanted = locked_versions(lock)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    wrong = sorted(f"{name} {have} (lock: {'/'.join(sorted(wanted[name]))})"
                   for name, have in installed.items() if name in wanted and have not in wanted[name])
    extra = sorted(set(installed) - set(wanted) - {"pip", "setuptools", "wheel", "uv"})
    if wrong:
        return Check("packages", "fail", "not the locked versions: " + ", ".join(wrong), REINSTALL)
    detail = f"{sum(n in wanted for n in installed)} installed packages match {lock.name}"
    if extra:
        return Check("packages", "warn", f"{detail}; not in the lock: {', '.join(extra[:8])}",
                     "a package installed by hand: uv sync --locked removes it")
    return Check("packages", "ok", detail)


def run_probe(settings: Settings, timeout_s: float = 300.0) -> tuple[list[Check], Probe | None]:
    """Import the worker's stack in a child process; the import check and the device facts."""
    try:
        proc = subprocess.run([sys.executable, "-m", "workers.import_probe", settings.device, settings.dtype],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [Check("imports", "fail", f"importing the worker's packages took over {timeout_s:.0f} s",
                      "check the disk the venv is on")], None
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = [x for x in lines if "module" in x]
    versions = {x["module"]: x.get("version") for x in done}
    label = ", ".join(f"{m} {v}" for m, v in versions.items())
    failed = next((x for x in done if "error" in x), None)
    if failed is not None:
        module = failed["module"]
        if module == "torch" and failed["version"] is None:
            return [Check("imports", "warn", "torch is not installed: this machine can submit jobs, not run a worker",
                          "bash deploy/bootstrap.sh worker")], None
        pair = f"{module} {failed['version']}"
        if module != "torch" and versions.get("torch"):
            pair += f" next to torch {versions['torch']}"
        return [Check("imports", "fail", f"{pair} does not import: {failed['error']}", REINSTALL)], None
    devices = next((x["devices"] for x in lines if "devices" in x), None)
    if devices is None:
        under_way = next((x["importing"] for x in reversed(lines) if "importing" in x), "?")
        why = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
        return [Check("imports", "fail", f"the interpreter died importing {under_way} ({label}): {why}"[:400],
                      REINSTALL)], None
    return [Check("imports", "ok", label)], devices


def check_devices(settings: Settings, devices: Probe) -> Check:
    if devices.get("error"):
        return Check("devices", "fail", devices["error"], "set TTSPOOL_DEVICE=auto or cpu, or check the NVIDIA driver")
    if devices["cuda"]:
        gpus = ", ".join(f"{g['name']} {g['memory_gib']} GiB (sm {g['capability']})" for g in devices["cuda"])
        seen = f"{len(devices['cuda'])} CUDA device(s): {gpus}; driver {devices['driver'] or '?'}, " \
               f"CUDA runtime {devices['cuda_runtime']}"
    else:
        feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in devices["cpu"].items())
        seen = f"no CUDA device; CPU with {os.cpu_count()} cores ({feats}), {devices['threads']} torch threads"
    line = f"{seen}; the engine runs on {devices['device']} in {devices['dtype']} ({devices['dtype_reason']})"
    if settings.quant != "none":
        line += f", GPT weights {settings.quant} (TTSPOOL_QUANT)"
        if devices["device"] != "cpu" or devices["dtype"] != "bfloat16":
            return Check("devices", "fail", line, "TTSPOOL_QUANT=int8 runs on the CPU in bfloat16 only: "
                         "set TTSPOOL_QUANT=none, or TTSPOOL_DEVICE=cpu and TTSPOOL_DTYPE=bfloat16")
    if devices["device"] == "cpu" and settings.device == "auto":
        return Check("devices", "warn", line, "fine for trying it out; a GPU is many times faster")
    return Check("devices", "ok", line)


def _sentinel_view(name: str, url: str, master_name: str) -> tuple[Check | None, str]:
    """What the sentinels of a sentinel:// URL say of the primary: a check when they
    cannot find it or fail it over, and a line for the report."""
    import redis

    from ..broker_redis import sentinel_hosts

    hosts, _ = sentinel_hosts(url)
    views: list[dict[str, Any]] = []
    unknown = False
    for host, port in hosts:
        sentinel = redis.Redis(host=host, port=port, socket_connect_timeout=2, socket_timeout=3)
        try:
            view = sentinel.sentinel_master(master_name)
            # A lost primary stays on the list as a replica that is down.
            view["replicas-up"] = sum(not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])
                                      for r in sentinel.sentinel_slaves(master_name))
            views.append(view)
        except redis.ResponseError:  # "No such master with that name"
            unknown = True
        except (redis.RedisError, OSError):
            pass
        finally:
            sentinel.close()
    shown = redact_url(url)
    if not views:
        if unknown:
            return Check(name, "fail", f"{shown}: no sentinel knows a primary named {master_name!r}",
                         "set TTSPOOL_REDIS_MASTER_NAME to the name in the sentinels' `sentinel monitor` line"), ""
        return Check(name, "fail", f"{shown}: none of its {len(hosts)} sentinels answers",
                     "start the sentinels, or fix the sentinel:// list"), ""
    view = views[0]
    quorum = int(view.get("quorum", 1))
    line = (f"Sentinel: {len(views)} of {len(hosts)} sentinels answer, primary {view.get('ip')}:{view.get('port')}, "
            f"{view['replicas-up']} replicas up, quorum {quorum}")
    if not view["replicas-up"]:
        return Check(name, "warn", f"{shown}: {line}", "add a replica: with none there is nothing to fail over to"), line
    if len(views) < max(quorum, 2):
        return Check(name, "warn", f"{shown}: {line}", "start the missing sentinels: too few to agree on a failover"), line
    return None, line


def _redis_check(name: str, url: str, master_name: str) -> Check:
    import redis

    from ..broker_redis import is_sentinel, redis_client

    shown = redact_url(url)
    sentinels, sentinel_line = _sentinel_view(name, url, master_name) if is_sentinel(url) else (None, "")
    if sentinels is not None and sentinels.status == "fail":
        return sentinels
    client = redis_client(url, master_name, socket_connect_timeout=3, socket_timeout=5)
    try:
        info = client.info()
        try:
            save = str(client.config_get("save").get("save", ""))
        except redis.ResponseError:  # managed Redis often disables CONFIG
            save = "?"
    except (redis.RedisError, OSError) as err:
        return Check(name, "fail", f"{shown} unreachable: {type(err).__name__}: {err}", REDIS_FIX)
    finally:
        client.close()
    detail = f"{shown}: Redis {info.get('redis_version')}" + (f"; {sentinel_line}" if sentinel_line else "")
    aof = bool(info.get("aof_enabled"))
    if info.get("maxmemory") and info.get("maxmemory_policy") != "noeviction":
        return Check(name, "warn", f"{detail}, maxmemory-policy {info.get('maxmemory_policy')}",
                     "set maxmemory-policy noeviction: an evicting Redis drops queued jobs")
    if not aof and save in ("", "?"):
        what = "AOF off, RDB unknown" if save == "?" else "AOF and RDB both off"
        return Check(name, "warn", f"{detail}, {what}: a Redis restart loses every queued job",
                     "appendonly yes (see docs/OPERATIONS.md)")
    if sentinels is not None:
        return Check(name, "warn", f"{detail}, persistence {'AOF' if aof else 'RDB ' + save}", sentinels.fix)
    return Check(name, "ok", f"{detail}, persistence {'AOF' if aof else 'RDB ' + save}")


def check_broker(settings: Settings) -> list[Check]:
    checks = [_redis_check("broker", settings.broker_url, settings.redis_master_name)]
    if settings.backend_url != settings.broker_url:
        checks.append(_redis_check("results", settings.backend_url, settings.redis_master_name))
    return checks


def check_storage(settings: Settings) -> Check:
    from storage import StorageError, storage_for
    from storage.probe import fix_for, probe

    try:
        store = storage_for(settings, s3_max_attempts=2)
        probe(store)
    except (StorageError, ValueError) as err:
        return Check("storage", "fail", str(err), fix_for(settings.storage_url, err))
    return Check("storage", "ok", f"{store.base_url} writable (probe object written, read back, deleted)")


def check_model(settings: Settings) -> Check:
    from storage.models.cache import DEFAULT_REVISION, bad_files, check_cached_signature, list_models, model_dir
    from storage.models.manifest import ManifestError, official_manifest, sha256_file

    cache = settings.cache_path
    present = list_models(cache)
    listing = ", ".join(f"{m.model}@{m.revision} {m.state}" for m in present) or "empty"
    where = f"cache {cache}: {listing}"
    # As workers.engine.assets.resolve: a model name with a source set comes through the cache.
    fetched = settings.model_source is not None and "/" not in settings.model
    if settings.model.startswith("random-") and not fetched:
        return Check("model", "ok", f"{settings.model} is built on this node on first use; {where}")
    if "/" in settings.model:
        folder = Path(settings.model).expanduser()
        if not (folder / "asset").is_dir():
            return Check("model", "fail", f"{folder} is not a ChatTTS asset folder (no asset/ inside)",
                         "point TTSPOOL_MODEL at a ChatTTS asset folder")
        return Check("model", "ok", f"asset folder {folder}")
    if settings.model_dir and settings.model == "chattts":
        folder = Path(settings.model_dir).expanduser()
        try:
            files = official_manifest().files
        except ManifestError as err:
            return Check("model", "fail", str(err), REINSTALL)
        bad = [rel for rel, e in files.items()
               if not (folder / rel).is_file() or sha256_file(folder / rel) != e.sha256]
        if bad:
            return Check("model", "fail", f"TTSPOOL_MODEL_DIR {folder}: missing or failing sha256: {', '.join(bad)}",
                         "copy the official files again, or unset TTSPOOL_MODEL_DIR to fetch them")
        return Check("model", "ok", f"TTSPOOL_MODEL_DIR {folder}: {len(files)} official files verified")
    target = model_dir(cache, settings.model, settings.model_revision)
    source = settings.model_source or "hf"
    fetch = f"ttspool model fetch --source {source} --model {settings.model}"
    name = f"{settings.model}@{settings.model_revision or DEFAULT_REVISION}"
    entry = next((m for m in present if m.path == target), None)
    if entry is None:
        return Check("model", "warn", f"{name} is not in the cache; the first worker start fetches it from "
                     f"{redact_url(source)}; {where}", f"{fetch} now, while the network is there")
    if entry.state != "verified":
        return Check("model", "fail", f"{name} is {entry.state} in {target}", f"{fetch} (fetches what is missing)")
    bad = bad_files(target)
    if bad:
        return Check("model", "fail", f"{name} in {target}: failing sha256: {', '.join(bad)}",
                     f"{fetch} (refetches only the bad files)")
    if settings.model_pubkey_path is not None:
        try:
            check_cached_signature(target, settings.model_pubkey_path)
        except ManifestError as err:
            return Check("model", "fail", f"{name} in {target}: {err}; workers requiring TTSPOOL_MODEL_PUBKEY "
                         "will not load it", f"{fetch} from a source with a signed manifest")
    return Check("model", "ok", f"{name} verified (every file hashed); {where}")


def check_settings(settings: Settings, devices: Probe | None) -> list[Check]:
    checks: list[Check] = []
    kind = "cuda" if devices and str(devices.get("device", "")).startswith("cuda") else "cpu"
    batch_s = MAX_STEPS * _STEP_S[kind]
    uploads_s = settings.max_batch * settings.upload_retry_s
    need = settings.max_wait_ms / 1000 + batch_s + uploads_s
    if settings.visibility_timeout <= need:
        checks.append(Check(
            "settings", "fail",
            f"TTSPOOL_VISIBILITY_TIMEOUT={settings.visibility_timeout} s is shorter than a worst-case batch "
            f"on {kind} (~{batch_s:.0f} s) plus its uploads' retries ({settings.max_batch} x "
            f"{settings.upload_retry_s} s): Redis would hand running jobs to a second worker",
            f"TTSPOOL_VISIBILITY_TIMEOUT above {need:.0f}, or lower TTSPOOL_UPLOAD_RETRY_S / TTSPOOL_MAX_BATCH"))
    if settings.model_dir and settings.model != "chattts":
        checks.append(Check("settings", "warn", f"TTSPOOL_MODEL_DIR is ignored with TTSPOOL_MODEL={settings.model}",
                            "unset one of them"))
    if settings.compile and kind != "cuda":
        checks.append(Check("settings", "fail", "TTSPOOL_COMPILE=1 needs a CUDA device", "unset TTSPOOL_COMPILE"))
    if settings.lexicon:
        from ..text.lexicon import Lexicon

        try:
            Lexicon.load(settings.lexicon)
        except SettingsError as err:  # the worker refuses to start on it
            checks.append(Check("settings", "fail", str(err),
                                "point TTSPOOL_LEXICON at a readable file of `written<TAB>spoken` lines, or unset it"))
    return checks or [Check("settings", "ok", f"visibility timeout {settings.visibility_timeout} s covers a "
                                              f"worst-case batch and its upload retries (~{need:.0f} s)")]


CHECKS = ("python", "packages", "imports", "devices", "broker", "storage", "model", "settings")


def run_checks(settings: Settings, only: set[str] | None = None) -> list[Check]:
    want: Callable[[str], bool] = (lambda name: True) if not only else (lambda name: name in only)
    out: list[Check] = []
    if want("python"):
        out.append(check_python())
    if want("packages"):
        out.append(check_packages())
    devices = None
    if want("imports") or want("devices") or want("settings"):
        probe_checks, devices = run_probe(settings)
        if want("imports"):
            out += probe_checks
        if want("devices") and devices is not None:
            out.append(check_devices(settings, devices))
    if want("broker"):
        out += check_broker(settings)
    if want("storage"):
        out.append(check_storage(settings))
    if want("model"):
        out.append(check_model(settings))
    if want("settings"):
        out += check_settings(settings, devices)
    return out


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check that this machine can serve: one line per check, with the fix")
    p.add_argument("--json", action="store_true", help="one JSON object: {ok, checks: [{name, status, detail, fix}]}")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    only = {c.strip() for c in args.only.split(",")} if args.only else None
    unknown = (only or set()) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(sorted(unknown))}: choose from {', '.join(CHECKS)}")
    checks = run_checks(settings, only)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(c.line())
    return 1 if failed else 0
