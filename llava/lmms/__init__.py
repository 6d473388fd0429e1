"""lmms-eval plugin: Script's pruned models as lmms-eval models, registered through an entry point (no fork).

``pip install -e ".[lmms]"`` registers, in lmms-eval 0.7's ``lmms_eval.models`` entry-point group
(``ModelManifest``), the models of :mod:`llava.lmms.models`::

    accelerate launch -m lmms_eval --model script_llava_onevision \\
        --model_args pretrained=llava-hf/LLaVA-Video-7B-Qwen2-hf,method=script,budget=32,max_frames_num=64 \\
        --tasks videomme --batch_size 1 --output_path results/lmms

``script_qwen2_5_vl``, ``script_qwen3_vl`` and ``script_llava`` (LLaVA-1.5 / NeXT) take the same model_args
(EVAL.md "lmms-eval"). Every ``model_args`` key that is not a loading / decoding option
(:class:`llava.lmms.models.PluginArgs`) is a parameter of ``method`` and is checked by
``script_prune.check_params`` before the model loads.
"""
from __future__ import annotations

#: lmms-eval model id -> class in llava.lmms.models
MODELS = {
    "script_llava_onevision": "ScriptLlavaOnevision",
    "script_internvl": "ScriptInternVL",
    "script_qwen2_5_vl": "ScriptQwen2_5_VL",
    "script_qwen3_vl": "ScriptQwen3VL",
    "script_llava": "ScriptLlava",
}
ALIASES = {"script_llava_onevision": ("script_llava_video",)}


def manifests() -> list:
    """The entry point's payload: one ``ModelManifest`` per model (lmms-eval imports the class only when asked)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"llava.lmms.models.{cls}", aliases=ALIASES.get(name, ()))
            for name, cls in MODELS.items()]
