#!/usr/bin/env bash
# The main job: set everything up, then synthesize the shipped example jobs with one
# local worker and print where the WAV files are. Extra arguments go to `ttspool run`
# (e.g. --model random-tiny to run offline with random weights).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
need_redis=yes
[ -n "${TTSPOOL_BROKER_URL:-}" ] && need_redis=no
bash "$root/deploy/bootstrap.sh" worker "$need_redis"
cd "$root"
exec .venv/bin/ttspool run "$@"
