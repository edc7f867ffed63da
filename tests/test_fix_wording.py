"""An error's fix in the words of the surface it reaches. The library says what is wrong
(tasks/voices.py, tasks/schema.py); the CLI names its command and flag (`ttspool voice
add --replace`, `ttspool book`), the gateway its request (`POST /v1/voices` with
`"replace": true`, `/v1/audio/speech`), and neither names the other's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from tasks.cli.local_redis import LocalRedis
from tests.conftest import run_cli, stop_process
from tests.test_gateway import KEY_A, Gateway, start_gateway

LONG_TEXT = "This sentence is one of many. " * 170  # 5,100 characters
CLI_WORDS = ("ttspool ", "--replace", "--tenant")
HTTP_WORDS = ("/v1/", '"replace": true')


@pytest.fixture(scope="module")
def env(own_broker: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    store = tmp_path_factory.mktemp("store")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    return clean | {"TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": store.as_uri()}


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(env, tmp_path_factory.mktemp("gateway") / "gateway.log", TTSPOOL_API_KEYS=f"acme={KEY_A}")
    yield gw
    stop_process(gw.proc)


def _cli_error(env: dict[str, str], *args: str) -> str:
    proc = run_cli(env, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ttspool: error: "), proc.stderr[-2000:]
    return lines[0].removeprefix("ttspool: error: ")


def _http_error(gateway: Gateway, method: str, path: str, body: Any, status: int) -> str:
    got, _, raw = gateway.request(method, path, body, key=KEY_A)
    assert got == status, raw[:2000]
    message: str = json.loads(raw)["error"]["message"]
    assert not any(word in message for word in CLI_WORDS), message
    return message


def test_the_cli_names_its_commands(env: dict[str, str]) -> None:
    assert run_cli(env, "voice", "add", "narrator", "--seed", "4").returncode == 0
    assert _cli_error(env, "voice", "add", "narrator", "--seed", "5") == (
        "voice 'narrator' exists (version 1); replace it to make a new version "
        "(`ttspool voice add narrator --replace ...`)")
    assert _cli_error(env, "voice", "add", "narrator", "--seed", "6", "--tenant", "acme") == (
        "voice 'narrator' exists as a shared voice (version 1); replace it to put a voice of this tenant's own in its "
        "place, for this tenant's jobs only (`ttspool voice add narrator --tenant acme --replace ...`)")
    assert _cli_error(env, "voice", "rm", "alloy") == (
        "'alloy' is a built-in voice: replace it instead of removing it (`ttspool voice add alloy --replace ...`)")
    assert _cli_error(env, "submit", "Hello.", "--voice", "nobody") == (
        "invalid job: voice: unknown voice 'nobody': add it to the voice library first "
        "(`ttspool voice add nobody ...`; `ttspool voice list` lists them)")
    assert _cli_error(env, "voice", "show", "nobody", "--tenant", "acme") == (
        "unknown voice 'nobody': add it to the voice library first "
        "(`ttspool voice add nobody --tenant acme ...`; `ttspool voice list --tenant acme` lists them)")
    assert _cli_error(env, "submit", LONG_TEXT) == (
        "invalid job: text: text is longer than 2000 characters (5100); `ttspool book FILE` speaks a long text as "
        "one audio file, split into jobs at sentence ends")


def test_the_cli_says_so_line_by_line_in_a_jobs_file(env: dict[str, str], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in ({"text": "Fine."}, {"text": LONG_TEXT},
                                                      {"text": "Who?", "voice": "nobody"})) + "\n")
    proc = run_cli(env, "submit-file", str(jobs), "--strict")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[:2] == [
        f"ttspool: {jobs}: line 2: invalid job: text: text is longer than 2000 characters (5100); `ttspool book FILE` "
        "speaks a long text as one audio file, split into jobs at sentence ends",
        f"ttspool: {jobs}: line 3: invalid job: voice: unknown voice 'nobody': add it to the voice library first "
        "(`ttspool voice add nobody ...`; `ttspool voice list` lists them)"]


def test_the_gateway_names_its_requests(env: dict[str, str], gateway: Gateway) -> None:
    too_long = _http_error(gateway, "POST", "/v1/jobs", {"text": LONG_TEXT}, 400)
    assert too_long == ("invalid job: text: text is longer than 2000 characters (5100); POST /v1/audio/speech takes "
                        "input of up to 4096 characters and splits it into jobs itself")
    unknown = ("unknown voice 'nobody': add it to the voice library first (POST /v1/voices; GET /v1/voices lists "
               "them)")
    assert _http_error(gateway, "POST", "/v1/jobs", {"text": "Who?", "voice": "nobody"}, 400) == \
        f"invalid job: voice: {unknown}"
    speech = {"model": "tts-1", "input": "Who speaks?", "voice": "nobody"}
    assert _http_error(gateway, "POST", "/v1/audio/speech", speech, 400) == f"invalid job: voice: {unknown}"
    assert _http_error(gateway, "GET", "/v1/voices/nobody", None, 404) == "no voice 'nobody'"
    # acme's own voice; adding it again, and removing a built-in, each say `"replace": true`.
    assert gateway.request("POST", "/v1/voices", {"name": "reader", "seed": 3}, key=KEY_A)[0] == 201
    assert _http_error(gateway, "POST", "/v1/voices", {"name": "reader", "seed": 4}, 400) == (
        "voice 'reader' exists (version 1); replace it to make a new version "
        '(POST /v1/voices with "replace": true)')
    assert _http_error(gateway, "DELETE", "/v1/voices/alloy", None, 403) == (
        "'alloy' is a built-in voice: only the operator changes it; a tenant may replace it with a voice of its own "
        'of that name (POST /v1/voices with "replace": true)')
    # The CLI's words for the same voice, in the same space: the fix is the surface's.
    assert _cli_error(env, "voice", "add", "reader", "--seed", "4", "--tenant", "acme").endswith(
        "(`ttspool voice add reader --tenant acme --replace ...`)")
    assert not any(word in too_long + unknown for word in CLI_WORDS) and all(
        any(word in m for word in HTTP_WORDS) for m in (too_long, unknown))
