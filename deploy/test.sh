#!/usr/bin/env bash
# Set everything up, then run the whole test suite (real redis-server, a real S3
# endpoint, a real worker with the random-tiny model). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/deploy/bootstrap.sh" test yes
cd "$root"
exec .venv/bin/python -m pytest "$@"
