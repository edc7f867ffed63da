"""Benchmark: parallel ranged fetch vs one stream from a mirror that caps each connection.

    python -m workers.bench.fetch_bench [--size-mib 256] [--rate-mib 10] [--streams 8]

A local Range server (workers.bench.range_server) limits every connection to --rate-mib MiB/s,
as a CDN edge or a long fat pipe does; a generated file is fetched through the model
cache twice (verified, into fresh caches): once in one stream, once in parallel ranges.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from storage.models.fetch_http import MiB, HttpPolicy
from storage.models.cache import fetch_model
from storage.models.manifest import write_manifest
from workers.bench.range_server import RangeServer


def _timed_fetch(url: str, cache: Path, policy: HttpPolicy) -> float:
    t0 = time.perf_counter()
    fetch_model(url, cache, policy=policy, tty=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rate-mib", type=float, default=10.0, help="bandwidth cap per connection")
    ap.add_argument("--streams", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp:
        mirror = Path(tmp) / "mirror"
        (mirror / "asset").mkdir(parents=True)
        with open(mirror / "asset" / "weights.safetensors", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        write_manifest(mirror, "bench")
        with RangeServer(mirror, rate_bps=args.rate_mib * MiB) as server:
            single = _timed_fetch(server.url, Path(tmp) / "c1", HttpPolicy(parallel_min=2**62))
            parallel = _timed_fetch(server.url, Path(tmp) / "c2", HttpPolicy(max_streams=args.streams))
    print(f"file {args.size_mib} MiB, cap {args.rate_mib:g} MiB/s per connection, {args.streams} streams")
    print("| mode | wall s | MiB/s |")
    print("|---|---|---|")
    for name, secs in (("one stream", single), (f"{args.streams} ranges in flight", parallel)):
        print(f"| {name} | {secs:.1f} | {args.size_mib / secs:.1f} |")
    print(f"speedup: {single / parallel:.2f}x")


if __name__ == "__main__":
    main()
