"""What a worker accepts off its queues: the Celery protocol-2 JSON envelope, checked.

Any client in any language can push anything onto a Redis list, so the worker looks at
each popped item before kombu and Celery do: neither is written for hostile input (an id
that is a list breaks the batch buffer, an integer id breaks every Redis key built from
it, an ETA holds a prefetch slot until it falls due, deep nesting overflows the stack).
An item that fails here is taken off the queue and recorded once, with a reason; it
never reaches Celery. Pure and torch-free, so it is tested alone (tests/test_envelope.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Collection

from .claims import is_task_id
from .settings import TASK_NAME

# A job's kwargs are a few KB (2,000 characters of text, a 4 KB speaker string); 1 MiB
# leaves room for any honest job and bounds the work a single message can cost.
MAX_BODY_BYTES = 1 << 20
# Headers Celery reads, with the JSON types it expects; a wrong type would raise inside
# Celery's request handling, where nothing records a reason.
_OPTIONAL_STR = (str, type(None))
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "lang": _OPTIONAL_STR, "root_id": _OPTIONAL_STR, "parent_id": _OPTIONAL_STR, "group": _OPTIONAL_STR,
    "group_index": (int, type(None)), "shadow": _OPTIONAL_STR, "origin": _OPTIONAL_STR,
    "argsrepr": _OPTIONAL_STR, "kwargsrepr": _OPTIONAL_STR, "retries": (int,),
    "ignore_result": (bool,), "replaced_task_nesting": (int,), "stamped_headers": (list, type(None)),
    "stamps": (dict,),
}


# kombu keys its unacked records by the tag and Redis encodes it: printable ASCII only.
_TAG = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True)
class Rejection:
    reason: str  # a fixed word, the metric's label
    detail: str  # one readable line for the job's recorded failure and the log
    job_id: str | None  # the id to record the failure under, when the message names a usable one


def check(message: Any, tasks: Collection[str]) -> Rejection | None:
    """None when `message` (a decoded queue item) is one the worker can run safely."""
    if not isinstance(message, dict):
        return Rejection("not_envelope", f"queue item is a JSON {type(message).__name__}, not a message envelope", None)
    headers, props = message.get("headers"), message.get("properties")
    if not isinstance(headers, dict) or not isinstance(props, dict):
        return Rejection("not_envelope", "envelope has no headers or properties object", None)
    tag = props.get("delivery_tag")
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or not isinstance(props.get("delivery_info"), dict):
        return Rejection("not_envelope", "envelope properties need a delivery_tag of 1-128 printable ASCII "
                                         "characters and a delivery_info object", None)
    if props.get("body_encoding") not in (None, "base64"):
        return Rejection("not_envelope", "properties.body_encoding must be base64", None)
    job_id = headers.get("id")
    if job_id is None:
        return Rejection("no_id", "message has no headers.id", None)
    if not is_task_id(job_id):
        return Rejection("bad_id", f"headers.id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                                   f"after its tenant and ':' for a tenant's job (got a JSON {type(job_id).__name__})",
                         None)
    task = headers.get("task")
    if not isinstance(task, str):
        return Rejection("bad_header", "headers.task is not a string", job_id)
    if task not in tasks:
        return Rejection("unknown_task", f"NotRegistered: no task {task[:80]!r} on this worker "
                                         f"(it runs {', '.join(sorted(tasks))})", job_id)
    for name, types in _HEADER_TYPES.items():
        if name in headers and not isinstance(headers[name], types):
            return Rejection("bad_header", f"headers.{name} has the wrong type ({type(headers[name]).__name__})", job_id)
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, list) and len(limits) == 2 and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in limits)):
        return Rejection("bad_header", "headers.timelimit must be [hard, soft] seconds or null", job_id)
    if task == TASK_NAME:
        # A Celery ETA (countdown) would sit in this worker's memory, holding a prefetch
        # slot and a batch window, until it falls due. ttspool schedules by priority and
        # deadline instead; a client that wants a later start submits later.
        for name in ("eta", "expires"):
            if headers.get(name) is not None:
                return Rejection(name, f"Celery {name} is not supported for {TASK_NAME} (a countdown or eta holds "
                                       "a worker slot until it falls due); use expires_at or ttl_s for deadlines, "
                                       "and submit later for a later start", job_id)
    return _check_body(message, job_id)


def _check_body(message: dict[str, Any], job_id: str) -> Rejection | None:
    if message.get("content-type") != "application/json" or message.get("content-encoding", "utf-8") != "utf-8":
        return Rejection("content_type", f"content type {str(message.get('content-type'))[:60]!r} is not accepted: "
                                         "ttspool accepts JSON protocol-2 task messages only", job_id)
    body = message.get("body")
    if not isinstance(body, str):
        return Rejection("body", "message body is not a string", job_id)
    if len(body) > MAX_BODY_BYTES * 4 // 3 + 4:
        return Rejection("body", f"message body is longer than {MAX_BODY_BYTES} bytes", job_id)
    try:
        raw = base64.b64decode(body, validate=True) if message["properties"].get("body_encoding") == "base64" else body
        decoded = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        return Rejection("body", f"message body is not base64 JSON ({type(exc).__name__})", job_id)
    except RecursionError:
        return Rejection("body", "message body is nested too deeply", job_id)
    if len(raw) > MAX_BODY_BYTES:
        return Rejection("body", f"message body is longer than {MAX_BODY_BYTES} bytes", job_id)
    if (not isinstance(decoded, list) or len(decoded) != 3 or not isinstance(decoded[0], list)
            or not isinstance(decoded[1], dict) or not isinstance(decoded[2], (dict, type(None)))):
        return Rejection("body", "message body is not [args, kwargs, embed]", job_id)
    return None
