"""Who a job id belongs to: each id is claimed once, with a digest of its job and tenant.

Ids are per tenant: a tenant's `order-1` is the Celery task `<tenant>:order-1`
(`task_id`), so two tenants' ids never meet, in Redis or in the durable records, and no
tenant can learn which ids another uses. Within one space, a hand-made message reusing a
queued job's id would replace it without an owner: the producer claims every id it sends
(SET NX) before sending; the worker claims ids that arrive unclaimed (plain Celery
clients) and refuses a message whose id is claimed by a different job. The same job
submitted again (same digest) is idempotent: its existing id is returned.

A claim is written unsent and turned sent by the very script that pushes its message
(tasks/claimed_publish.py), so a producer that dies between the two leaves an unsent
claim, which a retry of the same job takes over and sends: never an id without a job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .schema import NAME, TENANT

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
    # False from the claim until its message is pushed (one script does both ends of
    # that, tasks/claimed_publish.py); a claim without "s" is sent (workers write those,
    # and producers before the mark).
    sent: bool = True

    def encode(self) -> str:
        # Without a tenant, no "t": a claim is kept for every job of the result window.
        return json.dumps({"d": self.digest, **({"t": self.tenant} if self.tenant is not None else {}),
                           "k": self.token, **({} if self.sent else {"s": 0})}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> "Claim":
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
            return cls(str(data["d"]), data.get("t"), str(data["k"]), data.get("s", 1) != 0)
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls("", None, text)  # the bare token of an older producer

    def same_job(self, other: "Claim") -> bool:
        if REJECTED in (self.digest, other.digest):
            return False
        return not self.digest or not other.digest or (self.digest == other.digest and self.tenant == other.tenant)


def claim_key(job_id: str) -> str:
    return CLAIM_PREFIX + job_id


# ':' is in neither a tenant nor an id (tasks/schema.py): the split is unambiguous.
_SCOPE = ":"


def task_id(tenant: str | None, job_id: str) -> str:
    """The Celery task id of a tenant's job id: the id itself for jobs with no tenant."""
    return job_id if tenant is None else f"{tenant}{_SCOPE}{job_id}"


def split_task_id(task: str) -> tuple[str | None, str]:
    """(tenant, job id) of a task id; the tenant None for an id of no tenant's space."""
    tenant, sep, job_id = task.rpartition(_SCOPE)
    return (tenant, job_id) if sep else (None, task)


def is_task_id(value: Any) -> bool:
    """Whether `value` can be a task id: a job id, or a tenant's ("tenant:id")."""
    if not isinstance(value, str):
        return False
    tenant, job_id = split_task_id(value)
    return NAME.fullmatch(job_id) is not None and (tenant is None or TENANT.fullmatch(tenant) is not None)


def in_own_space(task: str, kwargs: Any) -> bool:
    """Whether a message's task id lies in its job's tenant's space. An unscoped id with a
    tenant is accepted: producers before per-tenant ids sent those, and plain Celery
    clients may; a scoped id naming another tenant is a forgery."""
    scope, _ = split_task_id(task)
    return scope is None or scope == tenant_of(kwargs)


def taken_error(job_id: str) -> str:
    return (f"job_id {job_id!r} is already taken by a different job (another submission or tenant): "
            "choose another id, or resubmit the same job to get its status")
