"""Mirrors of model files for the fetch tests: `export-random` output served from disk."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.models.cache import COMPLETE
from storage.models.manifest import MANIFEST_NAME, parse_manifest, sha256_file, write_manifest
from workers.bench.range_server import RangeServer
from tasks.settings import Settings
from workers.engine.random_models import export_random

MiB = 1024 * 1024
BIG = "asset/0large.dat"  # sorts first, so a fetch starts with it
BIG_SIZE = 96 * MiB  # above the 64 MiB parallel threshold


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-tiny as `ttspool model export-random` writes it (built in the shared cache)."""
    out = tmp_path_factory.mktemp("export") / "random-tiny"
    export_random("random-tiny", Path(Settings.from_env().cache_dir) / "models", out)
    return out


def mirror_copy(src: Path, dest: Path) -> Path:
    """A copy of a mirror folder that costs no disk (hard links); edit it by replacing files."""
    shutil.copytree(src, dest, copy_function=os.link)
    return dest


@pytest.fixture(scope="session")
def big_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-tiny plus a generated 96 MiB file, under its own manifest."""
    out = mirror_copy(tiny_export, tmp_path_factory.mktemp("export") / "big")
    (out / BIG).write_bytes(os.urandom(BIG_SIZE))
    write_manifest(out, "random-tiny-big")
    return out


@pytest.fixture()
def mirror(tiny_export: Path) -> Iterator[RangeServer]:
    with RangeServer(tiny_export) as server:
        yield server


def assert_verified(target: Path, source: Path) -> None:
    """Every file of the source's manifest is in the cache with its digest; nothing half-done."""
    manifest = parse_manifest((source / MANIFEST_NAME).read_bytes())
    assert (target / COMPLETE).is_file()
    assert json.loads((target / COMPLETE).read_text())["files"] == len(manifest.files)
    for rel, entry in manifest.files.items():
        assert sha256_file(target / rel) == entry.sha256, rel
    assert not [p for p in target.rglob("*.partial*")]
