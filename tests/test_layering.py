"""The layering, read from the source (as test_security.py reads it for pickle): which
module may import which, and no import cycles between modules. The floors, bottom up:

- the contract: tasks/ without its composition roots (settings, schema, errors, states,
  the Celery app, producer API, text rules, books, rate limits). Everyone may import it;
  it imports nothing of the other packages and no torch;
- scheduler/ (pure policy: the contract's schema, text rules and settings, the standard
  library) and storage/ (object stores and model files: the contract's settings and
  errors, no Celery, no torch);
- workers/: the engine (torch), metrics and heap at the bottom, the batch pipeline
  (workers/pipeline/) above them, the Celery plumbing (workers/broker/) above that, and
  the worker process, faults and benchmarks on top;
- the composition roots, above everything: the CLI (tasks/cli/, which takes the worker
  side, torch and heavy modules only inside its handlers, so that a producer runs
  `ttspool submit` without them), the HTTP gateway (tasks/gateway/, torch-free: it serves
  without the worker side) and the queue exporter (tasks/queue_exporter.py). Nothing below
  imports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "scheduler", "storage", "workers")
TORCH = {"torch", "torchaudio", "ChatTTS", "transformers", "vocos", "celery_batches"}
CELERY = {"celery", "kombu", "celery_batches"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (a submodule when `from pkg import sub` names one)
    top_level: bool  # at import time, not inside a function
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> list[Import]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    type_only = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                 for n in ast.walk(i)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        top = id(node) not in nested
        if isinstance(node, ast.Import):
            out += [Import(name, a.name, top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(name, sub if _is_module(sub) else base, top, node.lineno))
    return out


def _all_imports() -> list[Import]:
    return [i for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py")) for i in _imports(path)]


def _top(target: str) -> str:
    return target.split(".")[0]


ROOTS = ("tasks.cli", "tasks.gateway", "tasks.queue_exporter")
# Inside workers/, bottom up: a room imports only from its own floor and those below.
WORKER_FLOORS = (("workers.engine", "workers.metrics", "workers.heap"), ("workers.pipeline",), ("workers.broker",))


def _is(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _worker_floor(module: str) -> int:
    return next((n for n, rooms in enumerate(WORKER_FLOORS) if _is(module, *rooms)), len(WORKER_FLOORS))


def _violation(i: Import) -> str | None:
    src, dst = i.module, _top(i.target)
    if _is(i.target, *ROOTS) and not _is(src, *ROOTS):
        return "nothing below the composition roots (CLI, gateway, exporter) imports them"
    if _is(src, "tasks.cli"):
        if i.top_level and (dst in TORCH or dst == "workers" or _is(i.target, "storage.models", "scheduler")):
            return "the CLI imports the worker side, torch or heavy modules only inside its handlers"
        return None
    if _is(src, "tasks.gateway", "tasks.queue_exporter"):
        if dst in TORCH or dst == "workers":
            return "the gateway and the exporter serve without the worker side or torch"
        return None
    if src.startswith("tasks"):
        if dst in TORCH:
            return "the producer side must not import torch"
        if dst in ("workers", "scheduler", "storage"):
            return "the contract (tasks/) imports nothing of the other packages"
    if src.startswith("scheduler"):
        if dst in TORCH | CELERY | {"redis", "storage", "workers", "boto3"}:
            return "the scheduler is pure policy"
        if dst == "tasks" and not _is(i.target, "tasks.schema", "tasks.text", "tasks.settings"):
            return "the scheduler takes only the schema, the text rules and settings from tasks/"
    if src.startswith("storage"):
        if dst in TORCH | CELERY | {"workers", "scheduler"}:
            return "storage knows nothing of Celery, the scheduler, the workers or torch"
        if dst == "tasks" and i.target not in ("tasks.settings", "tasks.errors"):
            return "storage takes only settings and errors from tasks/"
    if src.startswith("workers") and dst == "workers" and _worker_floor(i.target) > _worker_floor(src):
        return f"{src} may import the rooms of its floor and below, not {i.target} (WORKER_FLOORS)"
    return None


def test_every_import_goes_the_allowed_direction() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target}: {why}" for i in _all_imports() if (why := _violation(i))]
    assert not bad, "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles_between_modules() -> None:
    # Lazy imports count too: a cycle hidden in a function is still two modules that
    # cannot be understood (or moved) one without the other.
    graph: dict[str, set[str]] = {}
    for i in _all_imports():
        if _top(i.target) in PACKAGES and i.target != i.module:
            graph.setdefault(i.module, set()).add(i.target)
    assert not (cycles := find_cycles(graph)), "\n".join(cycles)


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


@pytest.mark.parametrize("source, expected", [
    ("tasks/book.py", "import torch\n"),
    ("scheduler/planner.py", "import redis\n"),
    ("scheduler/worker_policy.py", "from celery import Celery\n"),
    ("storage/local.py", "from celery import Celery\n"),
    ("tasks/cli/submit.py", "from workers.worker import run_worker\n"),
    ("tasks/settings.py", "from tasks.cli import main\n"),
    ("workers/metrics.py", "from tasks.gateway.app import create_app\n"),
    ("tasks/gateway/app.py", "from workers.pipeline.jobs import Job\n"),
    ("workers/engine/engine.py", "from workers.pipeline.jobs import Job\n"),
    ("workers/pipeline/runner.py", "from workers.broker.gpu_batches import GpuBatches\n"),
])
def test_the_rules_catch_a_wrong_import(source: str, expected: str) -> None:
    # The checker itself, on a real module with one bad import added.
    path = ROOT / source
    name = _module_name(path)
    tree = ast.parse(expected)
    bad = [Import(name, a.name if isinstance(node, ast.Import) else node.module or "", True, 1)
           for node in tree.body for a in node.names]
    assert all(_violation(i) for i in bad)


# The worker's data and pipeline modules: what a job is, how it is admitted, held,
# stored, recorded and reported. They name engine requests and results but need no
# model, so tests of them (and tools built on them) run without torch's ~8 s import.
TORCH_FREE_WORKER_MODULES = (
    "workers.engine.requests", "workers.metrics", "workers.pipeline.jobs", "workers.pipeline.admission",
    "workers.pipeline.held_work", "workers.pipeline.delivery", "workers.pipeline.recorder",
    "workers.pipeline.book_tracker", "workers.pipeline.rejections", "workers.pipeline.task_events",
    "workers.pipeline.voice_resolver", "workers.pipeline.runner", "workers.broker.transport",
    "workers.broker.consumer", "workers.broker.held_messages", "workers.broker.event_outbox",
    "workers.broker.gpu_batches",
)


def test_the_worker_data_modules_import_no_torch() -> None:
    code = ("import sys\n"
            f"for m in {TORCH_FREE_WORKER_MODULES!r}: __import__(m)\n"
            f"print(sorted(m for m in {sorted(TORCH - CELERY)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"imported by the worker's data modules: {out.stdout}"
