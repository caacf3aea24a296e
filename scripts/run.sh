#!/usr/bin/env bash
# The main job: set up, then run kvstrata on its embedded default (no servers).
#   scripts/run.sh [kvstrata demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kvstrata demo "$@"
