#!/usr/bin/env bash
# Makes PyPI's torchvision (a CUDA build) importable beside the CPU torch of a venv.
# bash scripts/torchvision_shim.sh PYTHON installs requirements/torchvision.txt without dependencies (they would
# pull a CUDA torch) and writes the .pth file that imports script_vllm/torchvision_shim.py at interpreter start
# (it defines the two operator schemas torchvision misses). transformers' processors then work: they use only
# torchvision's Python transforms.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$1"
"$py" -m pip install -q --no-deps -r requirements/torchvision.txt
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import script_vllm.torchvision_shim" > "$site/script_vllm_torchvision.pth"
"$py" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")'
