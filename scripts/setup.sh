#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with kvstrata and
# the given extras, plus the Debian packages the tests use.
#   scripts/setup.sh            # the package alone (the main job)
#   scripts/setup.sh test       # + test tools, Redis and SeaweedFS
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv
fi
# pip 23 backtracks for minutes over the AWS SDK's pins; a current pip does not.
.venv/bin/python -m pip install --quiet --upgrade pip

spec="."
[ -n "$extras" ] && spec=".[${extras}]"
echo "==> pip install -e '${spec}'"
.venv/bin/python -m pip install --quiet --editable "${spec}"

if [[ ",${extras}," == *",test,"* ]] && ! command -v redis-server >/dev/null; then
    echo "==> installing redis-server (Debian)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    # Debian's package may start a system instance on 6379; the tests start their own.
fi
