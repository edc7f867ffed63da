"""Failure reasons recorded in the result backend; the class name is part of the status."""


class JobFailed(Exception):
    """Synthesis ran and failed for this job (the reason says why)."""

    def __init__(self, message: str, reason: str = "synthesis") -> None:
        super().__init__(message)
        # A fixed word for the metrics' `reason` label; the message is free text.
        self.reason = reason


class MessageRejected(Exception):
    """The broker message could not be decoded or is not a ttspool job."""


class RedeliveryLimit(Exception):
    """The job was delivered too many times (it crashed or stalled the worker each time)."""


class JobExpired(Exception):
    """The job's deadline (expires_at, or enqueued_at + ttl_s) passed before it ran."""


class RateLimited(RuntimeError):
    """A tenant asked for more jobs than its token bucket holds; nothing was enqueued."""

    def __init__(self, message: str, tenant: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.retry_after_s = retry_after_s
