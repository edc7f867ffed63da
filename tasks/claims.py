"""Who a job id belongs to: each id is claimed once, with a digest of its job and tenant.

Job ids are one namespace in the broker, so without an owner a second submission of
`order-1` by another tenant would get the first tenant's job back, and a hand-made
message reusing a queued job's id would replace it. The producer claims every id it
sends (SET NX) before sending; the worker claims ids that arrive unclaimed (plain Celery
clients) and refuses a message whose id is claimed by a different job. The same job
submitted again (same digest) is idempotent: its existing id is returned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

# A claim lives as long as its job's result in Redis (Settings.result_ttl): a retried
# submit within it finds the first job; an id reused after it names a new job.
CLAIM_PREFIX = "ttspool:jobid:"
REJECTED = "rejected"


def digest_of(kwargs: Any) -> str:
    """The job's kwargs as sent (the producer's JobSpec.task_kwargs(), or what a worker
    received), minus when and under which id: equal for a resubmission of the same job.
    Taken over the message itself, not a re-parsed spec, so both ends always agree."""
    fields = {k: v for k, v in kwargs.items() if k not in ("enqueued_at", "job_id")} if isinstance(kwargs, Mapping) else kwargs
    try:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=repr)
    except (ValueError, TypeError, RecursionError):
        text = repr(fields)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tenant_of(kwargs: Any) -> str | None:
    tenant = kwargs.get("tenant") if isinstance(kwargs, Mapping) else None
    return tenant if isinstance(tenant, str) else None


@dataclass(frozen=True)
class Claim:
    # "" for a claim written before claims carried one: it matches any job. REJECTED for
    # an id a refused message named first: it matches none.
    digest: str
    tenant: str | None
    token: str  # who wrote it: a producer call (to recognise its own retried SET NX), or "worker"

    def encode(self) -> str:
        # Without a tenant, no "t": a claim is kept for every job of the result window.
        return json.dumps({"d": self.digest, **({"t": self.tenant} if self.tenant is not None else {}),
                           "k": self.token}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> "Claim":
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
            return cls(str(data["d"]), data.get("t"), str(data["k"]))
        except (ValueError, TypeError, KeyError):
            return cls("", None, text)  # the bare token of an older producer

    def same_job(self, other: "Claim") -> bool:
        if REJECTED in (self.digest, other.digest):
            return False
        return not self.digest or not other.digest or (self.digest == other.digest and self.tenant == other.tenant)


def claim_key(job_id: str) -> str:
    return CLAIM_PREFIX + job_id


def taken_error(job_id: str) -> str:
    return (f"job_id {job_id!r} is already taken by a different job (another submission or tenant): "
            "choose another id, or resubmit the same job to get its status")
