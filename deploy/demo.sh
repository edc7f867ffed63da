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
.venv/bin/ttspool run "$@"
# The commands after the demo (README, "Using it") are in .venv/bin, not yet on PATH.
echo "next: source $root/.venv/bin/activate (puts ttspool on PATH), then ttspool up: a local pool that stays (README, Using it)" >&2
