#!/usr/bin/env bash
# Regenerate uv.lock from pyproject.toml: run it after changing any dependency, extra or
# [tool.uv] setting in pyproject.toml, and commit both files together. Set-up
# (scripts/setup.sh: `uv sync --locked`) fails while the lock is out of date.
#   scripts/lock.sh              # re-resolve what changed, keep the other pins
#   scripts/lock.sh --upgrade    # move every package to its newest allowed version
#   scripts/lock.sh --check      # exit 0 if the lock is up to date, else 1
set -euo pipefail
cd "$(dirname "$0")/.."
exec "$(scripts/uv.sh)" lock "$@"
