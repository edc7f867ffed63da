"""The node's model cache: verified fetches, listing and pruning.

Layout under the cache root (`Settings.cache_dir`: TTSPOOL_CACHE_DIR, default `~/.cache/ttspool`):

    models/<model>/<revision>/          a fetched model, in the source's file layout
        manifest.json[.sig]             what was verified (as the source served it)
        .complete.json                  written last: every file is in place and verified
        .last_used                      touched on each load (for prune)
        <file>.partial[.json]           a download in progress and its resume state
    models/<model>/.<revision>.lock     held while fetching or pruning that revision
    models/<random-model>-v<N>/         random models built locally (workers.engine.random_models)

A file appears under its own name only after its sha256 matched, so a name in place
means a verified file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .fetch_http import FetchError, HttpPolicy, state_path
from .fetch_progress import FetchProgress
from .manifest import (MANIFEST_NAME, OFFICIAL_MODEL, SIGNATURE_NAME, FileEntry, Manifest, ManifestError,
                       check_model_name, check_official, official_manifest, parse_manifest, sha256_file,
                       verify_signature)
from .sources import Source, open_source

log = logging.getLogger("ttspool.fetch")

COMPLETE = ".complete.json"
LAST_USED = ".last_used"
RANDOM_INFO = "ttspool.json"  # workers.engine.random_models.MANIFEST, kept here without importing torch
DEFAULT_REVISION = "main"


def model_dir(cache_root: Path, model: str, revision: str | None) -> Path:
    return cache_root / "models" / check_model_name(model) / check_model_name(revision or DEFAULT_REVISION)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def touch_used(target: Path) -> None:
    (target / LAST_USED).touch()


def _stored(target: Path) -> Manifest | None:
    path = target / MANIFEST_NAME
    if not path.is_file():
        return None
    return parse_manifest(path.read_bytes())


def _digests(m: Manifest) -> dict[str, str]:
    return {p: e.sha256 for p, e in m.files.items()}


def _in_place(target: Path, rel: str, entry: FileEntry) -> bool:
    path = target / rel
    return path.is_file() and (entry.size is None or path.stat().st_size == entry.size)


def complete_model(target: Path, manifest: Manifest | None = None) -> bool:
    """Fetched before, all files in place (and, when given, for exactly this manifest)."""
    if not (target / COMPLETE).is_file():
        return False
    stored = _stored(target)
    if stored is None or (manifest is not None and _digests(stored) != _digests(manifest)):
        return False
    return all(_in_place(target, rel, e) for rel, e in stored.files.items())


def _resolve_manifest(src: Source, pubkey: Path | None) -> tuple[Manifest, bytes, bytes | None]:
    got = src.manifest()
    if got is None:
        if pubkey is not None:
            raise ManifestError(f"{src.display} has no manifest.json to check a signature on")
        # The official weights need no manifest: ChatTTS' sha256 map is the trusted one.
        return official_manifest(), b"", None
    raw, sig = got
    if pubkey is not None:
        verify_signature(raw, sig, pubkey)
    manifest = parse_manifest(raw)
    if manifest.model == OFFICIAL_MODEL:
        check_official(manifest)
    return manifest, raw, sig


def fetch_model(source: str, cache_root: Path, *, model: str | None = None, revision: str | None = None,
                pubkey: Path | None = None, attempts: int = 3, policy: HttpPolicy | None = None,
                tty: bool | None = None, s3_endpoint_url: str | None = None) -> Path:
    """Fetch a model into the cache (once per node, verified) and return its folder."""
    src = open_source(source, revision, policy or HttpPolicy(), s3_endpoint_url)
    manifest, raw, sig = _resolve_manifest(src, pubkey)
    if model is not None and manifest.model != model:
        raise ManifestError(f"{src.display} serves model {manifest.model!r}, not {model!r}")
    target = model_dir(cache_root, manifest.model, revision)
    # Several workers on one node may start together: one fetches, the others wait and
    # then find every file in place.
    with _locked(_lock_path(target)):
        if complete_model(target, manifest):
            log.info("%s@%s is in the cache at %s", manifest.model, revision or DEFAULT_REVISION, target)
            touch_used(target)
            return target
        prior = _stored(target) if (target / COMPLETE).is_file() else None
        target.mkdir(parents=True, exist_ok=True)
        (target / COMPLETE).unlink(missing_ok=True)
        progress = FetchProgress(src.kind, manifest.total_size() or None, tty)
        try:
            for rel, entry in sorted(manifest.files.items()):
                _fetch_file(src, target, rel, entry, prior, attempts, progress)
        finally:
            progress.close()
        if not raw:
            # Record the official files with the sizes they turned out to have.
            raw = Manifest(manifest.model, {
                rel: FileEntry(e.sha256, (target / rel).stat().st_size) for rel, e in manifest.files.items()
            }).to_json()
        (target / MANIFEST_NAME).write_bytes(raw)
        (target / SIGNATURE_NAME).unlink(missing_ok=True)
        if sig is not None:
            (target / SIGNATURE_NAME).write_bytes(sig)
        (target / COMPLETE).write_text(json.dumps({
            "model": manifest.model, "revision": revision or DEFAULT_REVISION, "source": src.kind,
            "fetched_at": time.time(), "files": len(manifest.files),
        }))
        touch_used(target)
    log.info("%s@%s verified in %s", manifest.model, revision or DEFAULT_REVISION, target)
    return target


def _fetch_file(src: Source, target: Path, rel: str, entry: FileEntry, prior: Manifest | None,
                attempts: int, progress: FetchProgress) -> None:
    final = target / rel
    if final.is_file():
        before = prior.files.get(rel) if prior is not None else None
        known = before is not None and before.sha256 == entry.sha256 and _in_place(target, rel, before)
        if known or sha256_file(final) == entry.sha256:
            progress.skip(entry.size)
            return
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    got = ""
    for attempt in range(1, attempts + 1):
        progress.start_file(rel, entry.size)
        src.fetch(rel, partial, entry.size, progress.advance)
        got = sha256_file(partial)
        if got == entry.sha256:
            os.replace(partial, final)
            progress.verified(rel)
            return
        log.warning("%s: sha256 mismatch (attempt %d of %d)", rel, attempt, attempts)
        partial.unlink(missing_ok=True)
        state_path(partial).unlink(missing_ok=True)
    raise FetchError(f"{rel} from {src.display}: sha256 mismatch on all {attempts} attempts "
                     f"(expected {entry.sha256}, got {got})")


@dataclass(frozen=True)
class CachedModel:
    model: str
    revision: str  # "built" for a random model made on this node
    path: Path
    size: int
    state: str  # verified | incomplete | corrupt | built
    last_used: float


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _last_used(path: Path) -> float:
    for stamp in (path / LAST_USED, path / COMPLETE, path / RANDOM_INFO, path):
        if stamp.exists():
            return stamp.stat().st_mtime
    return 0.0


def check_cached_signature(target: Path, pubkey: Path) -> None:
    """The manifest a cache entry was verified against must be signed by `pubkey` (ManifestError if not)."""
    sig = target / SIGNATURE_NAME
    verify_signature((target / MANIFEST_NAME).read_bytes(), sig.read_bytes() if sig.is_file() else None, pubkey)


def bad_files(target: Path) -> list[str]:
    """Files of a fetched model that are missing or no longer match their sha256 (slow: hashes all)."""
    stored = _stored(target)
    if stored is None:
        return [MANIFEST_NAME]
    return [rel for rel, e in sorted(stored.files.items())
            if not (target / rel).is_file() or sha256_file(target / rel) != e.sha256]


def _state(target: Path, verify: bool) -> str:
    if not complete_model(target):
        return "incomplete"
    if verify and bad_files(target):
        return "corrupt"
    return "verified"


def list_models(cache_root: Path, verify: bool = False) -> list[CachedModel]:
    models = cache_root / "models"
    out: list[CachedModel] = []
    for top in sorted(models.iterdir()) if models.is_dir() else []:
        if not top.is_dir() or top.name.startswith("."):
            continue
        if (top / RANDOM_INFO).is_file() and not (top / COMPLETE).exists():
            name = json.loads((top / RANDOM_INFO).read_text()).get("model", top.name)
            out.append(CachedModel(name, "built", top, _size(top), "built", _last_used(top)))
            continue
        for rev in sorted(p for p in top.iterdir() if p.is_dir()):
            out.append(CachedModel(top.name, rev.name, rev, _size(rev), _state(rev, verify), _last_used(rev)))
    return out


def _prune_lock(entry: CachedModel) -> Path:
    if entry.revision == "built":
        # workers.engine.random_models' build lock.
        return entry.path.parent / f".{entry.model}.lock"
    return _lock_path(entry.path)


def prune(cache_root: Path, older_than_s: float, dry_run: bool = False) -> list[CachedModel]:
    """Delete models not used for `older_than_s`; a model being fetched right now is kept."""
    cutoff = time.time() - older_than_s
    removed: list[CachedModel] = []
    for entry in list_models(cache_root):
        if entry.last_used >= cutoff:
            continue
        if dry_run:
            removed.append(entry)
            continue
        with _locked(_prune_lock(entry), wait=False) as got:
            if got:
                shutil.rmtree(entry.path)
                removed.append(entry)
    return removed


def parse_age(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d`, `2w` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit():
        raise ValueError(f"bad age {text!r}: expected a number and one of s, m, h, d, w (e.g. 7d)")
    return int(number) * units[unit]

