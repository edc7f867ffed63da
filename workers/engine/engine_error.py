"""The engine's own error: it cannot load, or cannot run as configured."""

from __future__ import annotations

from tasks.errors import TtspoolError


class EngineError(TtspoolError, RuntimeError):
    pass
