"""How the `ttspool` command reads as a user meets it: every option explained with its
default, global options on either side of the subcommand, one name per audio format,
and a prune that says what it did."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import pytest
import redis

from tasks.book import book_key
from tasks.cli import _parser
from tasks.cli.local_redis import LocalRedis
from tasks.cli.parsing import has_default, parsers
from tasks.settings import QUEUE_BULK
from tests.conftest import run_cli
from tests.test_doctor import closed_port


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTSPOOL_")}
    return env | {"TTSPOOL_STORAGE_URL": tmp_path.as_uri(), "TTSPOOL_CACHE_DIR": str(tmp_path / "cache")} | extra


def test_every_option_of_every_subcommand_has_help_and_its_default() -> None:
    missing, silent_defaults, seen = [], [], 0
    for prog, parser in parsers(_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{prog} {c.dest}" for c in action._choices_actions if not c.help]
                continue
            seen += 1
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{prog} {name}")
            elif has_default(action) and "default" not in formatter._expand_help(action):
                silent_defaults.append(f"{prog} {name}")
    assert seen > 150  # the walk reached the subcommands, nested ones included
    assert not missing, f"without help: {missing}"
    assert not silent_defaults, f"help that hides the default: {silent_defaults}"


def test_submit_help_names_defaults_and_the_global_options(tmp_path: Path) -> None:
    proc = run_cli(_env(tmp_path), "submit", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines at the terminal's width
    for said in ("--speed SPEED speaking speed, 0-9 (default: 5)", "--priority {realtime,bulk} queue: tts.realtime "
                 "or tts.bulk (default: bulk)", "--timeout TIMEOUT with --wait: seconds to wait for the result "
                 "(default: 600.0)", "global options: given before the subcommand or after it --broker-url URL"):
        assert said in text
    top = run_cli(_env(tmp_path), "--help")
    assert "given before the subcommand or after it" in " ".join(top.stdout.split())


@pytest.mark.parametrize("where", ["before", "after"])
def test_broker_url_before_or_after_the_subcommand(where: str, own_broker: LocalRedis, tmp_path: Path) -> None:
    # The environment names a Redis that is not there: the flag must win from either side.
    env = _env(tmp_path, TTSPOOL_BROKER_URL=f"redis://127.0.0.1:{closed_port()}/0")
    flag = ["--broker-url", own_broker.url]
    args = flag + ["submit", f"Said {where}.", "--priority", "bulk"] if where == "before" else \
        ["submit", f"Said {where}.", "--priority", "bulk"] + flag
    proc = run_cli(env, *args)
    assert proc.returncode == 0, proc.stderr
    with redis.Redis.from_url(own_broker.url) as r:
        queued = [json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE_BULK, 0, -1)]
    assert proc.stdout.strip() in queued
    if where == "before":
        return
    # After the subcommand it overrides the one before it.
    down = f"redis://127.0.0.1:{closed_port()}/0"
    proc = run_cli(env, "--broker-url", own_broker.url, "status", "some-job", "--broker-url", down)
    assert proc.returncode == 1 and down in proc.stderr


@pytest.mark.parametrize("asked", ["opus", "ogg"])
def test_a_book_names_ogg_opus_as_jobs_do(asked: str, own_broker: LocalRedis, tmp_path: Path) -> None:
    text = tmp_path / "chapter.txt"
    text.write_text("One sentence. Another one.", encoding="utf-8")
    proc = run_cli(_env(tmp_path, TTSPOOL_BROKER_URL=own_broker.url), "book", str(text), "--out-format", asked,
                   "--no-wait")
    assert proc.returncode == 0, proc.stderr
    book_id = proc.stdout.strip()
    with redis.Redis.from_url(own_broker.url) as r:
        spec = json.loads(r.hget(book_key(book_id), "spec") or b"{}")
    assert spec["format"] == "opus"
    if asked == "ogg":
        assert "ttspool: note: --out-format ogg is called opus now (Ogg Opus" in proc.stderr
    else:
        assert proc.stderr == ""


def test_model_prune_says_what_it_removed_and_what_it_freed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old, fresh = cache / "models" / "old-model" / "main", cache / "models" / "new-model" / "main"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"\0" * (3 << 20))
        (folder / ".last_used").touch()
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old / ".last_used", (ten_days_ago, ten_days_ago))
    env = _env(tmp_path)

    dry = run_cli(env, "model", "prune", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"^would remove old-model main 3\.0 MiB \(used 10\.0 days ago\) .*old-model/main$", dry.stdout, re.M)
    assert dry.stdout.splitlines()[-1] == "would free 3.0 MiB (1 model(s))" and old.is_dir()

    done = run_cli(env, "model", "prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "freed 3.0 MiB (1 model(s))"
    assert not old.exists() and fresh.is_dir()

    again = run_cli(env, "model", "prune", "--older-than", "7d")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"nothing in {cache} was last used more than 7d ago: nothing removed"
