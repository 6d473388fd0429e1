"""Script (and every vision-side selection method of ``script_prune``) inside vLLM, as a plugin.

Installed with the ``vllm`` extra, vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point
in every process; it registers the pruning-enabled Qwen2.5-VL and Qwen3-VL under vLLM's own architecture name, so an
unchanged ``vllm serve`` / ``LLM(...)`` picks it up. A request prunes when its ``mm_processor_kwargs`` carry
``script_budget`` (docs/vllm.md); others run the stock computation.
"""

from __future__ import annotations

import functools

#: the vLLM releases this plugin was tested on (docs/vllm.md); others are refused at load
SUPPORTED_VLLM = ("0.32.0",)
#: architecture name -> "module:class" of the pruning-enabled class
MODELS = {"Qwen2_5_VLForConditionalGeneration": "script_vllm.qwen2_5_vl:ScriptQwen2_5_VLForConditionalGeneration",
          "Qwen3VLForConditionalGeneration": "script_vllm.qwen3_vl:ScriptQwen3VLForConditionalGeneration"}


def check_vllm_version(installed: str | None = None) -> None:
    """RuntimeError naming the supported releases when the installed vLLM is not one of them."""
    if installed is None:
        import vllm

        installed = vllm.__version__
    if installed not in SUPPORTED_VLLM:
        raise RuntimeError(f"script_vllm supports vLLM {', '.join(SUPPORTED_VLLM)} (tested there); installed {installed}: "
                           f"pip install -r requirements/vllm.txt, or uninstall script-prune's vLLM plugin "
                           f"(VLLM_PLUGINS= to load none)")


def _enable_pruning_path(runner_cls: type) -> None:
    """After the model loads, switch on the runner's multimodal-pruning path (the call of
    ``recompute_mrope_positions``) for a Script model. vLLM turns it on only with ``--video-pruning-rate > 0``
    (which also starts EVS), and its CPU runner never does."""
    load = runner_cls.load_model
    if getattr(load, "_script_vllm", False):
        return

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        if getattr(self.get_model(), "script_prune", False):
            self.is_multimodal_pruning_enabled = True
        return out

    load_model._script_vllm = True
    runner_cls.load_model = load_model


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    check_vllm_version()
    from vllm import ModelRegistry
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, target in MODELS.items():
        ModelRegistry.register_model(name, target)
    for runner in (GPUModelRunner, CPUModelRunner):
        _enable_pruning_path(runner)
