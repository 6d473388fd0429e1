"""The vLLM plugin's tests: collected only where vLLM is installed (the environment of scripts/vllm_env.sh)."""

import importlib.util
import os

_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:  # not installed (a namespace match is some folder named vllm, not vLLM)
    collect_ignore_glob = ["test_*.py"]  # the main suite's environment: nothing to run here

# vLLM's CPU backend: the KV cache space (GiB) must be set; the engine in this process (no subprocess: faster)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
