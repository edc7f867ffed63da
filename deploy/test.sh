#!/usr/bin/env bash
# Set everything up, then run the whole test suite (real redis-server, a real S3
# endpoint, a real worker with the random-tiny model). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/deploy/bootstrap.sh" test yes
cd "$root"
# Two test processes (pytest-xdist): on two cores, one runs while the other waits on a
# worker, an outage or a timeout. --dist loadscope keeps each module on one process, so a
# module's own worker, gateway or engine (module-scoped fixtures) starts once.
exec .venv/bin/python -m pytest -n 2 --dist loadscope "$@"
