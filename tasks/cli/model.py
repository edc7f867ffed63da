"""`ttspool model ...`: fetch, list, prune and export model files in the node's cache."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..settings import Settings


_CACHE_DIR_HELP = "cache root (TTSPOOL_CACHE_DIR, default ~/.cache/ttspool)"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="model files: fetch into the node cache, list, prune, export")
    msub = p.add_subparsers(dest="model_command", required=True)

    f = msub.add_parser("fetch", help="fetch and verify a model into the cache")
    f.add_argument("--source",
                   help="hf | s3://bucket/prefix | http(s)://mirror/path | /local/dir (TTSPOOL_MODEL_SOURCE, else hf)")
    f.add_argument("--model", help="expected model name (default: the source's manifest; chattts without one)")
    f.add_argument("--revision", help="Hub revision for hf; a sub-folder of the source otherwise (TTSPOOL_MODEL_REVISION)")
    f.add_argument("--cache-dir", type=Path, help=_CACHE_DIR_HELP)
    f.add_argument("--pubkey", type=Path,
                   help="Ed25519 public key (PEM or 32 raw bytes): require a signed manifest (TTSPOOL_MODEL_PUBKEY)")
    f.add_argument("--attempts", type=int, default=3, help="fetches per file before a sha256 mismatch is fatal")
    f.set_defaults(handler=_fetch)

    ls = msub.add_parser("list", help="models in the cache: size, state, last use")
    ls.add_argument("--cache-dir", type=Path, help=_CACHE_DIR_HELP)
    ls.add_argument("--verify", action="store_true", help="re-hash every file (slow for big models)")
    ls.set_defaults(handler=_list)

    pr = msub.add_parser("prune", help="delete models not used for a while")
    pr.add_argument("--older-than", required=True, help="age since last use: 7d, 12h, 30m, 2w")
    pr.add_argument("--cache-dir", type=Path, help=_CACHE_DIR_HELP)
    pr.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    pr.set_defaults(handler=_prune)

    ex = msub.add_parser("export-random", help="write a random model's files and manifest.json (to seed a mirror)")
    ex.add_argument("--model", default="random-tiny", help="random-tiny | random-full")
    ex.add_argument("--cache-dir", type=Path, help=_CACHE_DIR_HELP + "; random models are built there")
    ex.add_argument("out", type=Path, help="folder to write the files and manifest.json to")
    ex.set_defaults(handler=_export_random)


def _root(args: argparse.Namespace, settings: Settings) -> Path:
    return args.cache_dir or settings.cache_path


def _log_setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


def _fetch(args: argparse.Namespace, settings: Settings) -> int:
    from storage.models.cache import fetch_model

    _log_setup()
    if args.attempts < 1:
        raise ValueError("--attempts must be at least 1")
    # A bad manifest or signature is a ValueError (exit 2); a failed download, a RuntimeError (exit 1).
    # Flags first, then the settings every worker fetches with: a hand-run fetch must not
    # fill the cache from another source, or unsigned where workers demand a signature.
    pubkey = args.pubkey or settings.model_pubkey_path
    print(fetch_model(args.source or settings.model_source or "hf", _root(args, settings), model=args.model,
                      revision=args.revision or settings.model_revision, pubkey=pubkey, attempts=args.attempts,
                      s3_endpoint_url=settings.s3_endpoint_url))
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from storage.models.cache import list_models

    now = time.time()
    for m in list_models(_root(args, settings), verify=args.verify):
        age_h = (now - m.last_used) / 3600
        print(f"{m.model:<16} {m.revision:<10} {m.size / 2**20:>10.1f} MiB  {m.state:<10} "
              f"used {age_h:.1f}h ago  {m.path}")
    return 0


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    from storage.models.cache import parse_age, prune

    root = _root(args, settings)
    now = time.time()
    removed = prune(root, parse_age(args.older_than), dry_run=args.dry_run)
    for m in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {m.model} {m.revision} {m.size / 2**20:.1f} MiB "
              f"(used {(now - m.last_used) / 86400:.1f} days ago) {m.path}")
    if not removed:
        print(f"nothing in {root} was last used more than {args.older_than} ago: nothing removed")
    else:
        freed = sum(m.size for m in removed) / 2**20
        print(f"{'would free' if args.dry_run else 'freed'} {freed:.1f} MiB ({len(removed)} model(s))")
    return 0


def _export_random(args: argparse.Namespace, settings: Settings) -> int:
    from workers.engine.random_models import export_random

    manifest = export_random(args.model, _root(args, settings) / "models", args.out)
    print(f"{args.out}: {len(manifest.files)} files, {manifest.total_size() / 2**20:.1f} MiB")
    return 0
