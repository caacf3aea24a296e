#!/usr/bin/env bash
# Prints the path of uv at the version the project pins, installing it from PyPI into
# .tools/uv first if PATH has no such uv. Used by setup.sh and lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION="0.13.10"
version_of() { "$1" --version 2>/dev/null | cut -d' ' -f2; }
uv="$(command -v uv || true)"
if [ -n "$uv" ] && [ "$(version_of "$uv")" = "$UV_VERSION" ]; then
    echo "$uv"; exit 0
fi
uv="$PWD/.tools/uv/bin/uv"
if [ ! -x "$uv" ] || [ "$(version_of "$uv")" != "$UV_VERSION" ]; then
    "${PYTHON:-python3}" -m venv .tools/uv >&2
    .tools/uv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
fi
echo "$uv"
