"""Tests for the torch-free side: batching policy, length prediction, content keys, job schema."""

from __future__ import annotations

import json
import lzma
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pybase16384 as b14
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.content_keys import content_key, object_key
from tasks.text.lengths import MAX_STEPS, predicted_steps
from storage import safe_key
from tasks.schema import MAX_TEXT_CHARS, JobSpec, JobValidationError, parse_job

from .model_facts import steps_to_samples

ROOT = Path(__file__).resolve().parents[1]

# Derandomized so a failure reproduces on every run and CI is never flaky.
PROPS = settings(derandomize=True, max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


def test_producer_scheduler_and_storage_do_not_import_torch() -> None:
    # A fresh interpreter: under pytest another test file may already have imported
    # torch, so checking sys.modules here would prove nothing. Every module of the three
    # packages, and the CLI with all its verb groups (building the parser imports them).
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for pkg in ("tasks", "scheduler", "storage") for p in (ROOT / pkg).rglob("*.py")
                     if p.name != "__main__.py")
    code = (
        f"import importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "import tasks.cli; tasks.cli._parser(); "
        "import sys; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- lengths

@PROPS
@given(text=st.text(max_size=300), speed=st.integers(0, 9), max_tokens=st.integers(1, MAX_STEPS))
def test_predicted_steps_in_range(text: str, speed: int, max_tokens: int) -> None:
    assert 1 <= predicted_steps(text, speed, max_tokens) <= max_tokens


@PROPS
@given(prefix=st.text(max_size=200), suffix=st.text(max_size=200), speed=st.integers(0, 9))
def test_predicted_steps_monotone_in_text(prefix: str, suffix: str, speed: int) -> None:
    assert predicted_steps(prefix, speed) <= predicted_steps(prefix + suffix, speed)


def test_predicted_steps_orders_texts() -> None:
    short = "Hello there."
    long = "Hello there, this is a considerably longer sentence that should take more time to say."
    assert predicted_steps(long) > predicted_steps(short)
    # CJK characters are spoken, not skipped like unknown symbols.
    assert predicted_steps("你好世界，今天天气很好。") > predicted_steps("你好")
    assert predicted_steps("你好") > 1


def test_faster_speed_predicts_fewer_steps() -> None:
    text = "The quick brown fox jumps over the lazy dog, again and again."
    assert predicted_steps(text, speed=9) < predicted_steps(text, speed=5) < predicted_steps(text, speed=0)


def test_long_text_is_capped() -> None:
    assert predicted_steps("word " * 2000) == MAX_STEPS
    assert predicted_steps("word " * 2000, max_tokens=100) == 100


@pytest.mark.parametrize("n", [1, 2, 3, 100, MAX_STEPS])
def test_steps_to_samples(n: int) -> None:
    assert steps_to_samples(n) == 512 * n - 256


def test_steps_to_samples_zero() -> None:
    assert steps_to_samples(0) == 0


# ---------------------------------------------------------------- keys

BASE_PARAMS = JobSpec(text="x").sampling_params()
CHANGED = {"voice": 3, "seed": 1, "speed": 6, "temperature": 0.31, "top_p": 0.71, "top_k": 21, "max_tokens": 2047}


def test_content_key_deterministic() -> None:
    a = content_key("chattts", "Hello world", dict(BASE_PARAMS))
    assert a == content_key("chattts", "Hello world", dict(BASE_PARAMS))
    assert re.fullmatch(r"[0-9a-f]{64}", a)


def test_content_key_changes_with_model_and_text() -> None:
    base = content_key("chattts", "Hello world", BASE_PARAMS)
    assert content_key("random-tiny", "Hello world", BASE_PARAMS) != base
    assert content_key("chattts", "Hello world!", BASE_PARAMS) != base


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_content_key_changes_with_each_param(field: str) -> None:
    assert BASE_PARAMS[field] != CHANGED[field]
    changed = {**BASE_PARAMS, field: CHANGED[field]}
    assert content_key("chattts", "Hello", changed) != content_key("chattts", "Hello", BASE_PARAMS)


@PROPS
@given(perm=st.permutations(sorted(BASE_PARAMS)))
def test_content_key_ignores_param_order(perm: list[str]) -> None:
    reordered = {k: BASE_PARAMS[k] for k in perm}
    assert content_key("m", "t", reordered) == content_key("m", "t", BASE_PARAMS)


def test_content_key_ignores_job_id_and_priority() -> None:
    # Duplicates submitted under different ids or priorities must share one object.
    a = parse_job({"text": "Hello", "job_id": "a1", "priority": "realtime"})
    b = parse_job({"text": "Hello", "job_id": "b2", "priority": "bulk"})
    assert content_key("m", a.text, a.sampling_params()) == content_key("m", b.text, b.sampling_params())


@PROPS
@given(text=st.text(max_size=50))
def test_object_key_is_safe(text: str) -> None:
    h = content_key("chattts", text, BASE_PARAMS)
    key = object_key(h)
    assert key == f"audio/{h[:2]}/{h}.wav"
    assert re.fullmatch(r"audio/[0-9a-f]{2}/[0-9a-f]{64}\.wav", key)
    assert safe_key(key) == key


# ---------------------------------------------------------------- schema

FIELDS = list(JobSpec.model_fields)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
job_dicts = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=15), json_values, max_size=8)
# Most random dicts fail on `text` alone; half the cases get a valid text so the other
# validators are reached too.
job_dicts = job_dicts | job_dicts.map(lambda d: {**d, "text": "hello"})


@PROPS
@given(data=job_dicts | json_values)
def test_parse_job_fuzz_only_raises_validation_error(data: Any) -> None:
    try:
        job = parse_job(data)
    except JobValidationError:
        return
    assert isinstance(job, JobSpec)


@PROPS
@given(text=st.text(min_size=1, max_size=60), speed=st.integers(0, 9), seed=st.integers(0, 2**31 - 1),
       voice=st.integers(0, 2**31 - 1), top_k=st.integers(1, 625))
def test_parse_job_valid_fields_accepted(text: str, speed: int, seed: int, voice: int, top_k: int) -> None:
    data = {"text": "Hi " + text.replace("<", "").replace(">", ""), "speed": speed, "seed": seed,
            "voice": voice, "top_k": top_k}
    try:
        job = parse_job(data)
    except JobValidationError as err:
        # Only text can be refused here (control characters from the random suffix).
        assert "text" in str(err) and "control characters" in str(err)
        return
    assert (job.speed, job.seed, job.voice, job.top_k) == (speed, seed, voice, top_k)
    # A job's kwargs must survive a JSON round trip into the same job (worker re-validates).
    assert parse_job(json.loads(json.dumps(job.task_kwargs()))) == job


@pytest.mark.parametrize(
    "data, field",
    [
        ({"text": ""}, "text"),
        ({"text": "   \n\t "}, "text"),
        ({"text": "<speak></speak>"}, "text"),
        ({"text": "a" * (MAX_TEXT_CHARS + 1)}, "text"),
        ({"text": "a" * (MAX_TEXT_CHARS * 3)}, "text"),
        ({"text": "hello\x00world"}, "text"),
        ({"text": "bell\x07"}, "text"),
        ({"text": "esc\x1b[31m"}, "text"),
        ({"text": "hi", "colour": "red"}, "colour"),
        ({"text": "hi", "speed": "5"}, "speed"),
        ({"text": "hi", "voice": 1.5}, "voice"),
        ({"text": "hi", "temperature": True}, "temperature"),
        ({"text": "hi", "seed": 1.0}, "seed"),
        ({"text": "hi", "top_k": "20"}, "top_k"),
        ({"text": "hi", "speed": 10}, "speed"),
        ({"text": "hi", "speed": -1}, "speed"),
        ({"text": "hi", "top_k": 0}, "top_k"),
        ({"text": "hi", "top_k": 626}, "top_k"),
        ({"text": "hi", "top_p": 0}, "top_p"),
        ({"text": "hi", "top_p": 1.5}, "top_p"),
        ({"text": "hi", "temperature": 0}, "temperature"),
        ({"text": "hi", "temperature": float("nan")}, "temperature"),
        ({"text": "hi", "expires_at": float("nan")}, "expires_at"),
        ({"text": "hi", "enqueued_at": float("inf")}, "enqueued_at"),
        ({"text": "hi", "ttl_s": float("inf")}, "ttl_s"),
        ({"text": "hi", "expires_at": float("-inf")}, "expires_at"),
        ({"text": "hi", "max_tokens": 5000}, "max_tokens"),
        ({"text": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text": "hi", "seed": -1}, "seed"),
        ({"text": "hi", "seed": 2**31}, "seed"),
        ({"text": "hi", "priority": "urgent"}, "priority"),
        ({"text": "hi", "job_id": "a/b"}, "job_id"),
        ({"text": "hi", "job_id": ".."}, "job_id"),
        ({"text": "hi", "job_id": "../etc"}, "job_id"),
        ({"text": "hi", "job_id": "a" * 200}, "job_id"),
        ({"text": "hi", "job_id": ""}, "job_id"),
        ({"text": "hi", "voice": "not a speaker"}, "voice"),
        ({"text": "hi", "voice": "42"}, "voice"),
        ({"text": "hi", "voice": -3}, "voice"),
        ({"text": "hi", "voice": "x" * 5000}, "voice"),
        ({"speed": 5}, "text"),
    ],
)
def test_parse_job_rejects(data: dict[str, Any], field: str) -> None:
    with pytest.raises(JobValidationError) as info:
        parse_job(data)
    assert re.search(rf"\b{field}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("data", [None, [], "text", 5, [{"text": "hi"}]])
def test_parse_job_rejects_non_objects(data: Any) -> None:
    with pytest.raises(JobValidationError, match="JSON object"):
        parse_job(data)


def test_parse_job_reports_every_bad_field() -> None:
    with pytest.raises(JobValidationError) as info:
        parse_job({"text": "", "speed": 11, "top_k": 0})
    msg = str(info.value)
    assert all(f in msg for f in ("text", "speed", "top_k"))


def test_parse_job_strips_markup_and_whitespace() -> None:
    assert parse_job({"text": "<speak>Hello</speak>"}).text == "Hello"
    assert parse_job({"text": 'Hi<break time="1s"/>there'}).text == "Hi there"
    assert parse_job({"text": "  a \n\t b  "}).text == "a b"
    # ChatTTS control tokens are square-bracketed and must survive.
    assert parse_job({"text": "Hi [uv_break] there"}).text == "Hi [uv_break] there"


def test_parse_job_defaults_and_boundaries() -> None:
    job = parse_job({"text": "Hello"})
    assert (job.voice, job.seed, job.speed, job.top_k, job.max_tokens, job.priority) == (2, 0, 5, 20, MAX_STEPS, "bulk")
    edge = parse_job({"text": "a" * MAX_TEXT_CHARS, "speed": 9, "top_k": 625, "top_p": 1, "temperature": 2,
                      "max_tokens": MAX_STEPS, "seed": 2**31 - 1, "job_id": "A" + "b" * 127, "priority": "realtime"})
    assert edge.top_p == 1 and edge.job_id == "A" + "b" * 127
    assert parse_job(job) is job


def _speaker_string(dim: int = 768, seed: int = 0) -> str:
    # Built exactly the way ChatTTS' sample_random_speaker / _encode_spk_emb does it.
    emb = np.random.default_rng(seed).standard_normal(dim).astype(np.float16)
    compressed = lzma.compress(
        emb.tobytes(),
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}],
    )
    return b14.encode_to_string(compressed)


def test_parse_job_accepts_chattts_speaker_string() -> None:
    spk = _speaker_string()
    job = parse_job({"text": "Hello", "voice": spk})
    assert job.voice == spk
    # The speaker string is part of the content key: another voice, another object.
    other = parse_job({"text": "Hello", "voice": _speaker_string(seed=1)})
    assert content_key("m", job.text, job.sampling_params()) != content_key("m", other.text, other.sampling_params())


def test_parse_job_rejects_speaker_string_of_wrong_size() -> None:
    with pytest.raises(JobValidationError, match="voice"):
        parse_job({"text": "Hello", "voice": _speaker_string(dim=4)})
