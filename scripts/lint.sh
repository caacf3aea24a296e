#!/usr/bin/env bash
# The lint command: ruff's formatter (check only) and linter (rules in pyproject.toml) over
# src, tests, benchmarks and examples, then the code-shape check of src/ (no class over 250
# lines, no function over 60: scripts/code_shape.py). Uses this checkout's .venv, where
# `scripts/setup.sh test` installs ruff. Every check runs; the exit status is 1 if any failed.
#   scripts/lint.sh
set -uo pipefail
cd "$(dirname "$0")/.."
paths=(src tests benchmarks examples)
if [ ! -x .venv/bin/ruff ]; then
    echo "lint: .venv/bin/ruff is missing (scripts/setup.sh test installs it)" >&2
    exit 1
fi
rc=0
.venv/bin/ruff format --check "${paths[@]}" || rc=1
.venv/bin/ruff check "${paths[@]}" || rc=1
.venv/bin/python scripts/code_shape.py src || rc=1
[ "$rc" -eq 0 ] || echo "lint: failed (see above)" >&2
exit "$rc"
