"""ttspool's own errors: one family, each with the CLI's exit status for it.

The job failure reasons are recorded in the result backend, where the class name is part
of the status, so those names are part of the contract.
"""

from __future__ import annotations


class TtspoolError(Exception):
    """Base of every error ttspool raises on purpose. The CLI prints `ttspool: error:
    <message>` on one line and exits with `exit_code`."""

    exit_code = 1


class UsageError(TtspoolError, ValueError):
    """Bad input or configuration: the caller must change something (exit status 2)."""

    exit_code = 2


class SettingsError(UsageError):
    """A TTSPOOL_* setting or flag is malformed or contradicts another."""


class JobUnknown(TtspoolError):
    """No job has this id: nobody submitted it, or its result and durable record are gone."""

    exit_code = 4


class JobFailed(TtspoolError):
    """Synthesis ran and failed for this job (the reason says why)."""

    def __init__(self, message: str, reason: str = "synthesis") -> None:
        super().__init__(message)
        # A fixed word for the metrics' `reason` label; the message is free text.
        self.reason = reason


class MessageRejected(TtspoolError):
    """The broker message could not be decoded or is not a ttspool job."""


class RedeliveryLimit(TtspoolError):
    """The job was in too many GPU batches that never returned (TTSPOOL_MAX_STRIKES)."""


class JobExpired(TtspoolError):
    """The job's deadline (expires_at, or enqueued_at + ttl_s) passed before it ran."""


class SubmitStopped(TtspoolError, RuntimeError):
    """A submit that stopped part-way: `enqueued` lists the ids it enqueued before it
    stopped (none when it stopped before the first). Submitting the same jobs again sends
    the rest, and only the rest: ids are idempotent (tasks/claims.py)."""

    exit_code = 75  # EX_TEMPFAIL: try again later

    def __init__(self, message: str, enqueued: list[str] | None = None) -> None:
        super().__init__(message)
        self.enqueued = list(enqueued or [])


class BrokerFull(SubmitStopped):
    """The broker's Redis refuses writes (maxmemory): new jobs cannot be enqueued now."""


class RateLimited(TtspoolError, RuntimeError):
    """A tenant asked for more jobs than its token bucket holds; nothing was enqueued."""

    def __init__(self, message: str, tenant: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.retry_after_s = retry_after_s
