"""Where a model's files come from: the official weights, a random model, or a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.models.cache import check_cached_signature, complete_model, fetch_model, model_dir, touch_used
from storage.models.manifest import OFFICIAL_MODEL, official_manifest, sha256_file
from tasks.settings import Settings

from .random_models import MANIFEST, RANDOM_MODELS, ensure_random_model


@dataclass(frozen=True)
class ModelAssets:
    model_id: str
    root: Path
    overrides: dict[str, Any]
    random: bool

    def paths(self) -> dict[str, str]:
        """Checkpoint paths in the keyword names `Chat._load` takes."""
        from ChatTTS.config.config import Path as AssetPaths
        from dataclasses import asdict

        return {k: str(self.root / v) for k, v in asdict(AssetPaths()).items()}


def _verify_official(root: Path) -> None:
    """Check the 9 files against ChatTTS' own sha256 map; refuse to load anything else."""
    for rel, entry in official_manifest().files.items():
        path = root / rel
        if not path.is_file() or sha256_file(path) != entry.sha256:
            raise RuntimeError(
                f"ChatTTS asset {path} is missing or fails its sha256 check "
                "(corrupt download, or not the official weights)"
            )


@dataclass(frozen=True)
class ModelFetch:
    """The node's model cache, where a missing model comes from, and the key it must be signed with."""

    cache_dir: Path
    source: str | None = None  # None: hf for the official weights; random models are built here
    revision: str | None = None
    pubkey: Path | None = None
    s3_endpoint_url: str | None = None  # for an s3:// source

    @classmethod
    def from_settings(cls, s: Settings) -> "ModelFetch":
        return cls(s.cache_path, s.model_source, s.model_revision, s.model_pubkey_path, s.s3_endpoint_url)


def _cached(model: str, fetch: ModelFetch) -> Path:
    """The model from the node's cache, fetched on first use.

    With a public key configured, a cache entry loads only if the manifest it was verified
    against carries a valid signature: an unsigned fetch (by hand, or by a node without the
    key) must not fill the cache that signed-only workers load from.
    Never ChatTTS' own source="local": it downloads and runs a binary.
    """
    target = model_dir(fetch.cache_dir, model, fetch.revision)
    if complete_model(target):
        if fetch.pubkey is not None:
            check_cached_signature(target, fetch.pubkey)
        touch_used(target)
        return target
    return fetch_model(fetch.source or "hf", fetch.cache_dir, model=model, revision=fetch.revision,
                       pubkey=fetch.pubkey, s3_endpoint_url=fetch.s3_endpoint_url)


def _from_folder(root: Path, name: str) -> ModelAssets:
    info = root / MANIFEST
    meta = json.loads(info.read_text()) if info.exists() else {}
    return ModelAssets(meta.get("model", name), root, meta.get("overrides", {}), bool(meta.get("random")))


def resolve(model: str, model_dir: str | None = None, fetch: ModelFetch | None = None) -> ModelAssets:
    """Where `model`'s files are. With a model source set, a model name (random ones
    included) comes from that source through the cache instead of being built here."""
    fetch = fetch or ModelFetch.from_settings(Settings.from_env())
    fetched = fetch.source is not None and "/" not in model
    if model in RANDOM_MODELS and not fetched:
        root = ensure_random_model(model, fetch.cache_dir / "models")
        return ModelAssets(model, root, json.loads((root / MANIFEST).read_text())["overrides"], True)
    if model == OFFICIAL_MODEL and model_dir:
        _verify_official(Path(model_dir))
        return ModelAssets(model, Path(model_dir), {}, False)
    if model == OFFICIAL_MODEL or fetched:
        return _from_folder(_cached(model, fetch), model)
    root = Path(model).expanduser()
    if not (root / "asset").is_dir():
        raise FileNotFoundError(f"{root} is not a ChatTTS asset folder (no asset/ inside)")
    return _from_folder(root, root.name)
