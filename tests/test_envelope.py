"""The envelope contract alone (tasks/envelope.py): what a worker accepts off its queues."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.envelope import MAX_BODY_BYTES, check
from tasks.settings import ASSEMBLE_TASK, TASK_NAME

from .conftest import raw_message

TASKS = frozenset({TASK_NAME, ASSEMBLE_TASK})
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def envelope(**headers: Any) -> dict[str, Any]:
    message = json.loads(raw_message("job-1", json.dumps([[], {"text": "hi"}, _EMBED]).encode()))
    message["headers"].update(headers)
    return message


def with_body(body: bytes) -> dict[str, Any]:
    message = envelope()
    message["body"] = base64.b64encode(body).decode()
    return message


def test_a_valid_message_passes() -> None:
    assert check(envelope(), TASKS) is None
    assert check(envelope(task=ASSEMBLE_TASK, eta="2030-01-01T00:00:00"), TASKS) is None  # its retries use countdown


@pytest.mark.parametrize(("message", "reason", "names_job"), [
    ([1, 2, 3], "not_envelope", False),
    ({"body": "x"}, "not_envelope", False),
    (envelope(id=["a", "list"]), "bad_id", False),
    (envelope(id=7), "bad_id", False),
    (envelope(id="\ud800x"), "bad_id", False),
    (envelope(id="../../etc"), "bad_id", False),
    (envelope(id=None), "no_id", False),
    (envelope(task=["x"]), "bad_header", True),
    (envelope(task="ttspool.synthesise"), "unknown_task", True),
    (envelope(retries="3"), "bad_header", True),
    (envelope(timelimit="soon"), "bad_header", True),
    (envelope(task=ASSEMBLE_TASK, timelimit=[1]), "bad_header", True),
    (envelope(timelimit=[None, "x"]), "bad_header", True),
    (envelope(eta="2030-01-01T00:00:00+00:00"), "eta", True),
    (envelope(expires="2030-01-01T00:00:00+00:00"), "expires", True),
    (with_body(b"[" * 100_000), "body", True),
    (with_body(b"not json"), "body", True),
    (with_body(json.dumps({"text": "hi"}).encode()), "body", True),
    (with_body(json.dumps([[], {"text": "x" * MAX_BODY_BYTES}, None]).encode()), "body", True),
])
def test_each_way_to_break_a_worker_is_refused_with_a_reason(message: Any, reason: str, names_job: bool) -> None:
    rejection = check(message, TASKS)
    assert rejection is not None and rejection.reason == reason
    assert (rejection.job_id == "job-1") is names_job
    assert "\n" not in rejection.detail and len(rejection.detail) < 400


@pytest.mark.parametrize("props", [{"delivery_tag": 5}, {"delivery_tag": "\ud800"}, {"delivery_tag": "a b"},
                                   {"delivery_tag": "x" * 129}, {"delivery_info": None}, {"body_encoding": "zzz"}])
def test_properties_kombu_relies_on_are_checked(props: dict[str, Any]) -> None:
    message = envelope()
    message["properties"].update(props)
    assert check(message, TASKS).reason == "not_envelope"
    assert check(envelope(timelimit=[30, None]), TASKS) is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.dictionaries(st.sampled_from(["id", "task", "eta", "retries", "timelimit", "root_id", "group",
                                                "expires", "lang", "stamps", "x-extra"]), json_values, max_size=6))
def test_any_headers_give_a_verdict_never_an_exception(headers: dict[str, Any]) -> None:
    message = envelope(**headers)
    rejection = check(message, TASKS)
    if rejection is None:
        assert isinstance(message["headers"]["id"], str) and message["headers"]["task"] in TASKS
