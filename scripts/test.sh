#!/usr/bin/env bash
# The test command: installs what the tests need (packages, vLLM's CPU build, the
# SmolLM2 model, Redis), then runs them. The tests start their own Redis and
# SeaweedFS (S3) servers on 127.0.0.1 and free ports, and stop exactly those.
# No test may skip here (KVSTRATA_NO_SKIP=1 turns a skip into a failure).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export KVSTRATA_NO_SKIP=1 KVSTRATA_REQUIRE_MODEL=1
exec .venv/bin/python -m pytest "$@"
