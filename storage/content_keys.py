"""Content keys: the same request always maps to the same object in storage.

The key covers everything that changes the audio (model, normalized text, voice, seed,
sampling parameters, length cap) and nothing that does not (job id, priority), so
repeated prompts are served from storage and duplicates are synthesized once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_VERSION = 1


def content_key(model_id: str, normalized_text: str, params: dict[str, Any]) -> str:
    """Hex sha256 over a canonical JSON of the inputs that shape the audio."""
    canonical = json.dumps(
        {"v": KEY_VERSION, "model": model_id, "text": normalized_text, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def object_key(content_hash: str, extension: str = "wav") -> str:
    """Storage key for a content hash; two-level fan-out keeps directories small."""
    return f"audio/{content_hash[:2]}/{content_hash}.{extension}"
