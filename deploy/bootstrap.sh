#!/usr/bin/env bash
# Set up a fresh Debian machine with Python 3.11 for ttspool: a virtual environment in
# .venv with the project installed, and redis-server when it is needed and missing.
# Usage: bash deploy/bootstrap.sh EXTRA NEED_REDIS   (EXTRA: worker|test; NEED_REDIS: yes|no)
set -euo pipefail

extra="${1:-worker}"
need_redis="${2:-yes}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    echo "installing $* with apt-get" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

python="${PYTHON:-}"
if [ -z "$python" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            python="$candidate"; break
        fi
    done
fi
[ -n "$python" ] || { echo "ttspool needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv 2>/dev/null || { apt_install python3.11-venv && "$python" -m venv .venv; }
fi

# Reinstall only when the dependency list changed: torch alone is several GB.
stamp=".venv/.ttspool-$extra-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extra]"
    rm -f .venv/.ttspool-"$extra"-* && touch "$stamp"
fi

if [ "$need_redis" = yes ] && ! command -v redis-server >/dev/null; then
    apt_install redis-server
fi

# The tests validate deploy/prometheus with promtool (Debian's prometheus package).
if [ "$extra" = test ] && ! command -v promtool >/dev/null; then
    apt_install prometheus
fi
