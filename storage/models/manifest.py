"""What a model is made of: file paths with their sha256 and size, and the checks on them.

A model other than the official ChatTTS weights is described by `manifest.json` at the
root of its source: `{"model": NAME, "files": {"rel/path": {"sha256": HEX, "size": N}}}`,
optionally signed with Ed25519 (`manifest.json.sig`, the 64 raw signature bytes over the
exact manifest bytes). The official weights are described by ChatTTS' own sha256 map.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.errors import UsageError

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
OFFICIAL_MODEL = "chattts"

# The 9 files ChatTTS' check_all_assets hashes, in its key naming (sha256_ + path with
# "/" and "." as "_"); the map itself is read from the installed package.
OFFICIAL_FILES = (
    "asset/Decoder.safetensors", "asset/DVAE.safetensors", "asset/Embed.safetensors",
    "asset/Vocos.safetensors", "asset/gpt/config.json", "asset/gpt/model.safetensors",
    "asset/tokenizer/special_tokens_map.json", "asset/tokenizer/tokenizer_config.json",
    "asset/tokenizer/tokenizer.json",
)
# Pickle-based checkpoints run code when loaded; a fetched model may only carry data.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HEX = re.compile(r"[0-9a-f]{64}")
_RESERVED_SUFFIXES = (".partial", ".partial.json", ".lock")


class ManifestError(UsageError):
    """A manifest that is malformed, unsigned where a signature is required, or forged."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int | None  # None: unknown up front (ChatTTS' map has digests only)


@dataclass(frozen=True)
class Manifest:
    model: str
    files: dict[str, FileEntry]

    def to_json(self) -> bytes:
        files = {
            p: {"sha256": e.sha256, **({} if e.size is None else {"size": e.size})}
            for p, e in sorted(self.files.items())
        }
        return (json.dumps({"model": self.model, "files": files}, indent=1) + "\n").encode()

    def total_size(self) -> int:
        return sum(e.size or 0 for e in self.files.values())


def check_model_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ManifestError(f"bad model name {name!r}: letters, digits, '.', '_', '-' only")
    return name


def check_rel_path(path: str) -> str:
    """A manifest path must stay inside the model folder and be plain data."""
    p = PurePosixPath(path)
    if (
        not path or "\\" in path or p.is_absolute() or path != p.as_posix()
        or any(part in ("", ".", "..") or part.startswith(".") for part in p.parts)
    ):
        raise ManifestError(f"bad file path {path!r} in manifest: relative, no '..', no hidden parts")
    if path in (MANIFEST_NAME, SIGNATURE_NAME) or path.endswith(_RESERVED_SUFFIXES):
        raise ManifestError(f"file path {path!r} in manifest collides with the cache's own files")
    if path.lower().endswith(_PICKLE_SUFFIXES):
        raise ManifestError(f"refusing {path!r}: pickle checkpoints execute code when loaded")
    return path


def parse_manifest(raw: bytes) -> Manifest:
    try:
        doc: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"manifest.json is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str) or not isinstance(doc.get("files"), dict):
        raise ManifestError('manifest.json must be {"model": NAME, "files": {PATH: {"sha256", "size"}}}')
    if not doc["files"]:
        raise ManifestError("manifest.json lists no files")
    files: dict[str, FileEntry] = {}
    for path, entry in doc["files"].items():
        check_rel_path(path)
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _HEX.fullmatch(sha):
            raise ManifestError(f"manifest entry {path!r}: sha256 must be 64 lowercase hex digits")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise ManifestError(f"manifest entry {path!r}: size must be a non-negative integer")
        files[path] = FileEntry(sha, size)
    return Manifest(check_model_name(doc["model"]), files)


def official_manifest() -> Manifest:
    """The official weights, from ChatTTS' sha256 map (found without importing ChatTTS/torch)."""
    spec = importlib.util.find_spec("ChatTTS")
    if spec is None or not spec.submodule_search_locations:
        raise ManifestError("the ChatTTS package is not installed: its sha256 map describes the official weights")
    sha_map_path = Path(list(spec.submodule_search_locations)[0]) / "res" / "sha256_map.json"
    sha_map: dict[str, str] = json.loads(sha_map_path.read_text())
    files = {p: FileEntry(sha_map["sha256_" + p.replace("/", "_").replace(".", "_")], None) for p in OFFICIAL_FILES}
    if len(files) != len(sha_map):
        raise ManifestError(f"{sha_map_path} lists files this version of ttspool does not know")
    return Manifest(OFFICIAL_MODEL, files)


def check_official(manifest: Manifest) -> None:
    """A manifest may name the official model only with the official digests."""
    official = official_manifest()
    theirs = {p: e.sha256 for p, e in manifest.files.items()}
    if theirs != {p: e.sha256 for p, e in official.files.items()}:
        raise ManifestError("manifest claims model 'chattts' but its files differ from ChatTTS' sha256 map")


def verify_signature(raw: bytes, signature: bytes | None, pubkey_file: Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pubkey_file.read_bytes()
    key: Any = Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 else load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestError(f"{pubkey_file} is not an Ed25519 public key")
    if signature is None:
        raise ManifestError("a public key was given but the source has no manifest.json.sig")
    try:
        key.verify(signature, raw)
    except InvalidSignature:
        raise ManifestError("manifest.json signature does not verify against the given public key") from None


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(root: Path, model: str) -> Manifest:
    """Describe every file under `root` (except the manifest and its signature)."""
    files = {
        p.relative_to(root).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME)
    }
    manifest = Manifest(check_model_name(model), files)
    for path in files:
        check_rel_path(path)
    return manifest


def write_manifest(root: Path, model: str) -> Manifest:
    manifest = build_manifest(root, model)
    # A new file, not a rewrite in place: the old one may be a hard link into another mirror.
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_bytes(manifest.to_json())
    os.replace(tmp, root / MANIFEST_NAME)
    return manifest
