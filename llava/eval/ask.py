"""Ask any supported transformers VLM one question about images or a video, with visual-token pruning.

    python -m llava.eval.ask --model Qwen/Qwen2.5-VL-7B-Instruct --image view.jpg \\
        --question "What is in the picture?" --method script --budget 0.25
    python -m llava.eval.ask --model llava-hf/LLaVA-Video-7B-Qwen2-hf --video clip.mp4 --max-frames 32 \\
        --question "What happens?" --method divprune --budget 32

The model class comes from the checkpoint's ``model_type`` among the families ``script_prune.patch``
supports (LLaVA, LLaVA-NeXT, LLaVA-OneVision / LLaVA-Video, InternVL, Qwen2.5-VL, Qwen3-VL); the prompt from
the checkpoint's processor and chat template. Prints the answer, the visual tokens that reached the LLM
(kept per visual row and in total, against the unpruned count) and the time to first token (from the
start of ``generate``: vision tower, selection and prefill, until the first token is streamed).
Everything about the method (name, budget, parameters) is checked before the model loads.

transformers builds the OneVision, InternVL and Qwen-VL processors with a video processor, which needs
torchvision. Without torchvision, image requests use the same processor class without its video processor
(``without_video_processor``) and ``--video`` is refused, naming what to install.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import script_prune as sp
from script_prune.budget import check_budget

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class AskResult:
    """answer; kept / unpruned: visual tokens per row (kept, and before pruning); visual_tokens: tokens that reached
    the LLM (kept ones plus layout tokens such as newlines), unpruned_visual_tokens: the prompt's placeholders;
    time_to_first_token_s: seconds from the start of generate() to the first streamed token."""

    answer: str
    kept: list[int]
    unpruned: list[int]
    visual_tokens: int
    unpruned_visual_tokens: int
    time_to_first_token_s: float


class FirstTokenClock:
    """A generate() streamer that records when the first new token arrives (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            value.tolist()  # waits for the device, so the time includes the whole prefill
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def parse_budget(text: str) -> int | float:
    """``"64"`` -> 64 tokens per row, ``"0.25"`` -> a quarter of every row; checked by ``check_budget``."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--budget must be an int >= 1 or a float in (0, 1), got {text!r}") from None
    return check_budget(value, "--budget")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub id or local folder of a transformers checkpoint")
    p.add_argument("--image", nargs="+", default=[], help="one or several image files")
    p.add_argument("--video", default=None, help="a video file (decoded with PyAV, script_prune.video)")
    p.add_argument("--max-frames", type=int, default=32, help="frames sampled from --video (default 32)")
    p.add_argument("--question", required=True)
    p.add_argument("--method", default="script", help=f"one of {', '.join(sp.list_methods())} (default script)")
    p.add_argument("--budget", default=None,
                   help="visual tokens kept per row (int) or the fraction kept (float in (0, 1)); default: the family's")
    p.add_argument("--param", "--pruning-param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter (repeatable), e.g. --param gsp_ratio=0.3 or --param layer=2 (fastv)")
    p.add_argument("--relevance", default="llm_text", choices=["llm_text"],
                   help="query relevance for the methods that need it: the LLM's embeddings of the question "
                        "(clip_text needs a CLIP text tower, see script_prune.patch.ClipText)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float16 on CUDA, else float32")
    p.add_argument("--max-new-tokens", type=int, default=128)
    return p


def check_args(args: argparse.Namespace) -> tuple[int | float | None, dict[str, Any]]:
    """Everything that can be checked before loading: method, budget, parameters, inputs. -> budget, params"""
    from llava.eval.common import parse_pruning_params

    if args.method not in sp.list_methods():
        raise ValueError(f"--method must be one of {sp.list_methods()}, got {args.method!r}")
    budget = None if args.budget is None else parse_budget(args.budget)
    params = sp.check_params(args.method, parse_pruning_params(args.params))
    if not args.image and args.video is None:
        raise ValueError("give --image (one or several files) and/or --video")
    if args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return budget, params


def model_class(name_or_path: str) -> type:
    """The transformers class of a checkpoint, from its config's ``model_type``, among the supported families."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if name not in sp.patch.supported_classes():
        raise ValueError(f"--model {name_or_path}: model_type {model_type!r} is not a family script_prune.patch supports "
                         f"({', '.join(sp.patch.supported_classes())}); original LLaVA checkpoints: "
                         "python -m llava.eval.run_llava")
    return getattr(transformers, name)


def torchvision_hint() -> str:
    """What to install for transformers' video processors, for the installed torch."""
    return (f"install the torchvision release built for torch {torch.__version__} (torch 2.13: torchvision==0.28.0, "
            "requirements/torchvision.txt; beside this project's CPU torch also run scripts/torchvision_shim.sh, "
            "README 'Tests')")


def without_video_processor(processor_cls: type) -> type:
    """``processor_cls`` (a transformers ``ProcessorMixin``) made of its other sub-processors alone. transformers
    loads, checks and keeps exactly the sub-processors ``get_attributes`` names, so this subclass reads the image
    processor, tokenizer, chat template and processor_config.json of a checkpoint and never builds the video
    processor; images and text are processed as by ``processor_cls``, videos are not (refused before, in ask)."""

    def get_attributes(cls) -> list[str]:
        return [name for name in processor_cls.get_attributes() if name != "video_processor"]

    return type(processor_cls.__name__, (processor_cls,), {"get_attributes": classmethod(get_attributes),
                                                          "__module__": __name__})


def load_processor(name_or_path: str, videos: bool) -> Any:
    """The checkpoint's processor: ``AutoProcessor``, or, where torchvision is missing and the family's processor
    has a video processor, ``without_video_processor`` of it for images (``videos``: refused, naming torchvision)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    processor_cls = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(name_or_path))]
    if is_torchvision_available() or "video_processor" not in processor_cls.get_attributes():
        return AutoProcessor.from_pretrained(name_or_path)
    if videos:
        raise ValueError(f"--video needs torchvision, which is not installed: transformers builds the video processor "
                         f"of {processor_cls.__name__} on it; {torchvision_hint()}")
    return without_video_processor(processor_cls).from_pretrained(name_or_path)


def load_inputs(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The images (PIL, RGB) and videos (``script_prune.video.Video``: frames (F, H, W, 3) uint8, times) of the
    command line."""
    from PIL import Image

    images = []
    for path in args.image:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ValueError(f"--image {path}: cannot read it as an image ({error})") from error
    videos = []
    if args.video is not None:
        from script_prune.video import load_video

        videos.append(load_video(args.video, max_frames_num=args.max_frames))
    return images, videos


def ask(args: argparse.Namespace) -> AskResult:
    budget, params = check_args(args)
    images, videos = load_inputs(args)
    cls = model_class(args.model)
    processor = load_processor(args.model, videos=bool(videos))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    model = cls.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    family = sp.patch.family_of(model)
    if videos and "pixel_values_videos" not in family.visual_inputs:
        raise ValueError(f"--video: {cls.__name__} takes no video (family {family.name}); use --image")
    sp.patch.apply(model, method=args.method, **({} if budget is None else {"budget": budget}),
                   relevance=args.relevance, **params)
    content = ([{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
               + [{"type": "text", "text": args.question}])
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    video_kwargs = (dict(videos=[video.frames for video in videos], do_sample_frames=False,
                         video_metadata=[video.processor_metadata() for video in videos]) if videos else {})
    # images nested per prompt: one prompt with several images (OneVision then keeps only each image's base crop)
    inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt", **video_kwargs)
    inputs = {key: value.to(args.device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    inputs = {key: value.to(dtype) if key.startswith("pixel_values") else value for key, value in inputs.items()}
    unpruned = family.row_lengths(model, inputs)
    placeholders = int(family.placeholder_mask(model, inputs["input_ids"]).sum())
    clock = FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=clock)
    ttft = (clock.first if clock.first is not None else time.perf_counter()) - start
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    kept = [int(k.shape[0]) for k in sp.patch.kept(model)]
    return AskResult(answer, kept, unpruned, sp.patch.visual_tokens(model)[0], placeholders, ttft)


def report(result: AskResult, method: str) -> str:
    share = 100.0 * result.visual_tokens / max(result.unpruned_visual_tokens, 1)
    rows = " ".join(f"{k}/{n}" for k, n in zip(result.kept, result.unpruned))
    return "\n".join([
        result.answer,
        f"method: {method}",
        f"visual tokens to LLM: {result.visual_tokens} of {result.unpruned_visual_tokens} unpruned ({share:.1f}%)",
        f"kept per row: {sum(result.kept)} of {sum(result.unpruned)} in {len(result.kept)} rows: {rows}",
        f"time to first token: {result.time_to_first_token_s * 1000:.1f} ms",
    ])


def main(argv: Sequence[str] | None = None) -> AskResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    result = ask(args)
    print(report(result, args.method))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
