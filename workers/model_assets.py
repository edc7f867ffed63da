"""Where a model's files come from: the official weights, a random model, or a folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .random_models import MANIFEST, RANDOM_MODELS, ensure_random_model

HF_REPO = "2Noise/ChatTTS"


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


def cache_dir() -> Path:
    return Path(os.environ.get("TTSPOOL_CACHE_DIR") or Path.home() / ".cache" / "ttspool")


def _verify_official(root: Path) -> None:
    """Check the 9 files against ChatTTS' own sha256 map; refuse to load anything else."""
    import ChatTTS
    from ChatTTS.utils.dl import check_all_assets

    with open(Path(ChatTTS.__file__).parent / "res" / "sha256_map.json") as f:
        expected: dict[str, str] = json.load(f)
    if not check_all_assets(root, expected, update=False):
        raise RuntimeError(
            f"ChatTTS assets in {root} are missing or fail their sha256 check "
            "(corrupt download, or not the official weights)"
        )


def resolve(model: str, model_dir: str | None = None) -> ModelAssets:
    if model in RANDOM_MODELS:
        root = ensure_random_model(model, cache_dir() / "models")
        return ModelAssets(model, root, json.loads((root / MANIFEST).read_text())["overrides"], True)
    if model == "chattts":
        if model_dir:
            root = Path(model_dir)
        else:
            from huggingface_hub import snapshot_download

            # Never ChatTTS' own source="local": it downloads and runs a binary.
            root = Path(snapshot_download(HF_REPO, allow_patterns=["asset/*", "asset/**/*"]))
        _verify_official(root)
        return ModelAssets("chattts", root, {}, False)
    root = Path(model).expanduser()
    if not (root / "asset").is_dir():
        raise FileNotFoundError(f"{root} is not a ChatTTS asset folder (no asset/ inside)")
    manifest = root / MANIFEST
    meta = json.loads(manifest.read_text()) if manifest.exists() else {}
    return ModelAssets(meta.get("model", root.name), root, meta.get("overrides", {}), bool(meta.get("random")))
