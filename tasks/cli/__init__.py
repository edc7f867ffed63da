"""The `ttspool` command line: the composition root, the one place that may reach into
every package. Producer commands never import torch.

Each verb group is a module with `add_commands(sub)` (handlers set as parser defaults),
and must import without torch: heavy imports belong inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from ..errors import TtspoolError
from ..settings import Settings, redact_url
from .common import REDIS_FIX
from .fixes import cli_fix
from .parsing import Parser, add_global_options

Handler = Callable[[argparse.Namespace, Settings], int]

_COMMAND_MODULES: tuple[str, ...] = (
    "tasks.cli.submit", "tasks.cli.run", "tasks.cli.exporter", "tasks.cli.model", "tasks.cli.bulk",
    "tasks.cli.bench", "tasks.cli.doctor", "tasks.cli.text", "tasks.cli.serve", "tasks.cli.voice",
    "tasks.cli.simulate", "tasks.cli.up",
)


def _parser() -> argparse.ArgumentParser:
    ap = Parser(prog="ttspool", description="GPU batch text-to-speech on a Celery queue.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    add_global_options(ap)
    return ap


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().override(
        broker_url=args.broker_url,
        model=getattr(args, "model", None),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
        quant=getattr(args, "quant", None),
        compile=getattr(args, "compile", None),
        max_batch=getattr(args, "max_batch", None),
        max_wait_ms=getattr(args, "max_wait_ms", None),
        storage_url=getattr(args, "storage_url", None),
    )


def _fail(message: str, code: int, kind: str = "error") -> int:
    # One line, whatever the message: a multi-line text from a library stays readable.
    print(f"ttspool: {kind}: {' '.join(message.split())}", file=sys.stderr)
    return code


def _redis_down(err: Exception, settings: Settings | None) -> str | None:
    """The one-line message for a Redis that cannot be reached, or None for other errors.

    The client libraries are looked at only if a handler already loaded them: `--help`,
    `doctor` and `model` must work even where Celery does not import.
    """
    redis, kombu, celery = (sys.modules.get(m) for m in ("redis", "kombu.exceptions", "celery.exceptions"))
    where = "Redis"
    if settings is not None:
        urls = dict.fromkeys((settings.broker_url, settings.backend_url))
        where = "Redis at " + " / ".join(redact_url(u) for u in urls)
    if redis is not None and isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
        return f"cannot reach {where}: {err}; {REDIS_FIX}"
    if kombu is not None and isinstance(err, kombu.OperationalError):
        return f"cannot reach {where}: {err}; {REDIS_FIX}"
    if celery is not None and isinstance(err, celery.BackendError):
        return f"cannot read results from {where}: {err.__cause__ or err}; {REDIS_FIX}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = _settings(args)
        handler: Handler = args.handler
        return handler(args, settings)
    except TtspoolError as err:
        return _fail(str(err) + cli_fix(err), err.exit_code)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err), 2)
    except TimeoutError as err:
        return _fail(str(err), 3, "timeout")
    except Exception as err:
        message = _redis_down(err, settings)
        if message is not None:
            return _fail(message, 1)
        if isinstance(err, RuntimeError):
            return _fail(str(err), 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
