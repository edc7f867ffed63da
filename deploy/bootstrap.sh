#!/usr/bin/env bash
# Set up a fresh Debian machine with Python 3.11 for ttspool: a virtual environment in
# .venv holding exactly what uv.lock pins (the same lock the Docker image installs), and
# redis-server when it is needed and missing. After installing, a smoke step imports what
# the worker needs and names the broken package in one line when something does not load.
# Usage: bash deploy/bootstrap.sh EXTRA NEED_REDIS   (EXTRA: worker|test; NEED_REDIS: yes|no)
set -euo pipefail

extra="${1:-worker}"
need_redis="${2:-yes}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The uv release that reads uv.lock; the Dockerfile's uv image carries the same version.
UV_VERSION=0.13.8

die() { echo "bootstrap: $*" >&2; exit 1; }

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
[ -n "$python" ] || die "ttspool needs Python 3.11 (set PYTHON=/path/to/python3.11)"

# uv from PyPI into a folder of its own (not .venv: `uv sync` removes what the lock does
# not list), unless the same version is already on PATH.
uv=""
if command -v uv >/dev/null && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    uv="$(command -v uv)"
else
    tools=".tools/uv-$UV_VERSION"
    if [ ! -x "$tools/bin/uv" ]; then
        "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$tools" "uv==$UV_VERSION" \
            || die "could not install uv $UV_VERSION from PyPI with $python -m pip"
    fi
    uv="$root/$tools/bin/uv"
fi

# Sync only when the lock, the project's own metadata or this script changed (how a venv is
# installed is part of what it is: a new step must reach old venvs too). A sync for `worker`
# after `test` would remove the test tools, and a test venv holds everything a worker
# needs, so its stamp serves both. The stamp is written only after the smoke step passed.
digest="$(cat uv.lock pyproject.toml deploy/bootstrap.sh | sha256sum | cut -c1-16)"
# `worker` is what one machine needs to run the whole pool, as in the image: the gateway
# too (`ttspool serve`, `ttspool up`, `ttspool bench --gateway`). `test` holds both.
extras=(--extra "$extra")
[ "$extra" = worker ] && extras+=(--extra gateway)
if [ ! -e ".venv/.ttspool-$extra-$digest" ] && [ ! -e ".venv/.ttspool-test-$digest" ]; then
    rm -f .venv/.ttspool-*
    # --locked: refuse to run when pyproject.toml changed and uv.lock was not regenerated
    # (`uv lock`), instead of silently resolving new versions.
    # --compile-bytecode: write every package's .pyc now. Without them, each Python
    # process compiles what it imports from source whenever PYTHONDONTWRITEBYTECODE is
    # set (as on CI and in the image): 7 of a worker's 15 s cold start, measured.
    "$uv" sync --locked --compile-bytecode "${extras[@]}" --python "$python" --quiet \
        || die "uv sync from uv.lock failed (see above); after editing pyproject.toml, run: $uv lock"
    # Smoke step: import what the worker needs in a child process; on failure, one line
    # naming the package and version pair instead of a traceback at the first job.
    if ! smoke="$(.venv/bin/ttspool doctor --only python,packages,imports)"; then
        grep -v '^ok' <<<"$smoke" >&2
        die "the installed packages do not work together (the line above says which)"
    fi
    touch ".venv/.ttspool-$extra-$digest"
fi

# The project's own modules too (uv compiles site-packages only; an editable install's
# sources are here). Quick when nothing changed: compileall skips up-to-date files.
.venv/bin/python -m compileall -q -j 0 tasks scheduler workers storage >/dev/null

if [ "$need_redis" = yes ] && ! command -v redis-server >/dev/null; then
    apt_install redis-server
fi

# The tests validate deploy/prometheus with promtool (Debian's prometheus package).
if [ "$extra" = test ] && ! command -v promtool >/dev/null; then
    apt_install prometheus
fi

# The gateway's web page is tested in a real browser: Debian's Chromium and its driver.
if [ "$extra" = test ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
    apt_install chromium chromium-driver
fi
