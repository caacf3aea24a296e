#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them. The tests
# start their own Redis and SeaweedFS (S3) servers on 127.0.0.1 and free
# ports, and stop exactly those when they finish.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
