"""Where a model's files come from: the official weights, a random model, or a folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.model_cache import cache_root, complete_model, fetch_model, model_dir, touch_used
from storage.model_manifest import OFFICIAL_MODEL, official_manifest, sha256_file

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


def _cached(model: str) -> Path:
    """The model from the node's cache, fetched on first use (TTSPOOL_MODEL_SOURCE, default hf).

    Never ChatTTS' own source="local": it downloads and runs a binary.
    """
    revision = os.environ.get("TTSPOOL_MODEL_REVISION") or None
    target = model_dir(cache_root(), model, revision)
    if complete_model(target):
        touch_used(target)
        return target
    pubkey = os.environ.get("TTSPOOL_MODEL_PUBKEY")
    return fetch_model(os.environ.get("TTSPOOL_MODEL_SOURCE") or "hf", cache_root(), model=model,
                       revision=revision, pubkey=Path(pubkey) if pubkey else None)


def _from_folder(root: Path, name: str) -> ModelAssets:
    info = root / MANIFEST
    meta = json.loads(info.read_text()) if info.exists() else {}
    return ModelAssets(meta.get("model", name), root, meta.get("overrides", {}), bool(meta.get("random")))


def resolve(model: str, model_dir: str | None = None) -> ModelAssets:
    """Where `model`'s files are. With TTSPOOL_MODEL_SOURCE set, a model name (random ones
    included) comes from that source through the cache instead of being built here."""
    fetched = bool(os.environ.get("TTSPOOL_MODEL_SOURCE")) and "/" not in model
    if model in RANDOM_MODELS and not fetched:
        root = ensure_random_model(model, cache_root() / "models")
        return ModelAssets(model, root, json.loads((root / MANIFEST).read_text())["overrides"], True)
    if model == OFFICIAL_MODEL and model_dir:
        _verify_official(Path(model_dir))
        return ModelAssets(model, Path(model_dir), {}, False)
    if model == OFFICIAL_MODEL or fetched:
        return _from_folder(_cached(model), model)
    root = Path(model).expanduser()
    if not (root / "asset").is_dir():
        raise FileNotFoundError(f"{root} is not a ChatTTS asset folder (no asset/ inside)")
    return _from_folder(root, root.name)
