"""Failure reasons recorded in the result backend; the class name is part of the status."""


class JobFailed(Exception):
    """Synthesis ran and failed for this job (the reason says why)."""


class MessageRejected(Exception):
    """The broker message could not be decoded or is not a ttspool job."""


class RedeliveryLimit(Exception):
    """The job was delivered too many times (it crashed or stalled the worker each time)."""
