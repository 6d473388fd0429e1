"""lmms-eval models running transformers' VLM classes pruned by ``script_prune.patch``.

``ScriptLlavaOnevision`` (``--model script_llava_onevision``, alias ``script_llava_video``): LLaVA-Video /
LLaVA-OneVision on video tasks (MLVU, MVBench, LongVideoBench, Video-MME). lmms-eval hands a video path (or
a folder / list of frame files); frames are decoded by ``script_prune.video`` (PyAV), resized to the vision
tower's input and normalised with the checkpoint's image-processor statistics (as lmms-eval's ``llava_vid``
does), pooled 2x2 by averaging (``video_pooling=average``: LLaVA-Video's 169 tokens per 384 px frame), and
each frame is one pruned row: ``budget`` is tokens per frame.

``ScriptInternVL`` (``--model script_internvl``): InternVL3 (``OpenGVLab/InternVL3-8B-hf``) on image tasks. Images
are resized to ``image_size`` x ``image_size`` (the paper: 896, i.e. 2 x 2 tiles + thumbnail = 5 x 256 tokens),
tiled by the checkpoint's image processor, and each tile is one pruned row: ``budget`` is tokens per tile.

``ScriptQwen2_5_VL`` / ``ScriptQwen3VL`` (``--model script_qwen2_5_vl`` / ``script_qwen3_vl``): images and videos;
every image and every temporal step of a video is one pruned row (``budget``: tokens, or a fraction, per row).
Images need no torchvision (image processor + placeholders expanded here); videos go through the checkpoint's full
processor, whose video processor needs torchvision.

``ScriptLlava`` (``--model script_llava``): LLaVA-1.5 / LLaVA-NeXT in transformers' format (``llava-hf/*``, chosen by
the checkpoint's ``model_type``) on image tasks through the checkpoint's processor; rows as ``script_prune.patch``
(an image; NeXT: the base image and every anyres crop).

model_args (``key=value,...``): :class:`PluginArgs` fields, plus any parameter of ``method``
(``script_prune.get_method(method).params``); ``method=none`` runs the unpruned model. Bad arguments are
refused before the model loads.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

import script_prune as sp
from script_prune.video import Video, load_video, sample_indices

UNPRUNED = "none"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg")


@dataclass
class PluginArgs:
    """The loading / decoding options of ``--model_args``; every other key is a pruning parameter."""

    pretrained: str = ""
    method: str = "script"
    budget: int | float = 64             # visual tokens kept per row (frame / tile / image / crop), or a fraction in (0, 1)
    relevance: str = "llm_text"          # query relevance for query-conditioned methods (no CLIP text tower)
    max_frames_num: int = 64
    fps: float = 1.0
    force_sample: bool = True            # LLaVA-Video samples max_frames_num frames evenly
    video_pooling: str = "average"       # "average" (LLaVA-Video, 13x13) or "bilinear" (transformers, 14x14)
    image_size: int = 0                  # images resized to image_size x image_size first (InternVL3: 896); 0 = as given
    batch_size: int = 1                  # requests per generate() call (lmms-eval's --batch_size; BATCH= in the scripts)
    max_batch_size: int | None = None    # lmms-eval passes it; unused
    device: str = "auto"                 # "auto": this process's accelerator (accelerate launch), else CPU
    dtype: str = "bfloat16"
    max_new_tokens: int = 16             # when the task gives none
    attn_implementation: str = "sdpa"


def parse_args(kwargs: dict[str, Any]) -> tuple[PluginArgs, dict[str, Any]]:
    """``--model_args`` -> (options, method parameters), both validated; ValueError naming the argument."""
    names = {f.name for f in dataclasses.fields(PluginArgs)}
    options = {k: v for k, v in kwargs.items() if k in names}
    if isinstance(options.get("batch_size"), str) and options["batch_size"].isdigit():  # lmms-eval's --batch_size
        options["batch_size"] = int(options["batch_size"])
    params = {k: v for k, v in kwargs.items() if k not in names}
    args = PluginArgs(**options)
    if not args.pretrained:
        raise ValueError("model_args: pretrained=<checkpoint path or hub id> is required")
    if args.method != UNPRUNED:
        if args.method not in sp.list_methods():
            raise ValueError(f"model_args: method must be {UNPRUNED!r} or one of {sp.list_methods()}, got {args.method!r}")
        params = sp.check_params(args.method, params)
        args.budget = sp.check_budget(args.budget, "model_args: budget")
    elif params:
        raise ValueError(f"model_args: method=none (unpruned) takes no pruning parameters, got {sorted(params)}")
    for name, low in (("max_frames_num", 1), ("batch_size", 1), ("max_new_tokens", 1), ("image_size", 0)):
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"model_args: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(args.fps, (int, float)) or args.fps <= 0:
        raise ValueError(f"model_args: fps must be > 0, got {args.fps!r}")
    if args.dtype not in DTYPES:
        raise ValueError(f"model_args: dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    if args.video_pooling not in ("average", "bilinear"):
        raise ValueError(f"model_args: video_pooling must be 'average' or 'bilinear', got {args.video_pooling!r}")
    if not isinstance(args.force_sample, bool):
        raise ValueError(f"model_args: force_sample must be True or False, got {args.force_sample!r}")
    return args, params


def until_cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string of ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def is_video(visuals: list[Any]) -> bool:
    """Whether lmms-eval's visuals are one video: a single video file or a folder of frame images."""
    if len(visuals) != 1 or not isinstance(visuals[0], (str, os.PathLike)):
        return False
    path = Path(visuals[0])
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def frames_of(visuals: list[Any], args: PluginArgs) -> Video:
    """lmms-eval's visuals of a video request -> the sampled frames (``Video.frames`` (F, H, W, 3) uint8): a video
    file, a folder of frame images, or a list of frame images (MVBench's frame tasks; taken as 1 frame a second)."""
    if len(visuals) == 1 and isinstance(visuals[0], (str, os.PathLike)):
        path = Path(visuals[0])
        if path.is_dir():
            visuals = sorted(str(p) for p in path.iterdir())
        else:
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                raise ValueError(f"visual {path}: expected a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
            return load_video(path, args.max_frames_num, args.fps, args.force_sample)
    if not visuals or not all(isinstance(v, (str, os.PathLike, Image.Image)) for v in visuals):
        raise ValueError(f"a video request needs a video path or frame images, got {[type(v).__name__ for v in visuals]}")
    keep = sample_indices(len(visuals), 1.0, args.max_frames_num, 1.0, force_sample=True)
    frames = [v if isinstance(v, Image.Image) else Image.open(v) for v in (visuals[i] for i in keep.tolist())]
    frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    return Video(frames, keep.astype(np.float64), float(len(visuals)), keep, 1.0)


def normalise_frames(frames: np.ndarray, side: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, side, side) float32: bicubic resize to the tower's input, x / 255, (x - mean) / std."""
    resized = np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.BICUBIC)) for f in frames])
    pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, S, S)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def images_of(visuals: list[Any], image_size: int) -> list[Image.Image]:
    """lmms-eval's visuals of an image request -> RGB images, resized to ``image_size`` squared when it is set."""
    if not visuals:
        raise ValueError("a request without an image (text-only tasks are not supported)")
    if not all(isinstance(v, (str, os.PathLike, Image.Image)) for v in visuals):
        raise ValueError(f"an image request needs PIL images or image paths, got {[type(v).__name__ for v in visuals]}")
    images = [(v if isinstance(v, Image.Image) else Image.open(v)).convert("RGB") for v in visuals]
    if image_size:
        images = [im.resize((image_size, image_size), Image.BICUBIC) for im in images]
    return images


def expand(text: str, token: str, runs: list[str]) -> str:
    """``text`` with its i-th ``token`` replaced by ``runs[i]`` (one placeholder per image / video of the chat
    template -> the model's run of visual placeholders); ValueError when the counts differ."""
    pieces = text.split(token)
    if len(pieces) != len(runs) + 1:
        raise ValueError(f"chat template gave {len(pieces) - 1} {token} placeholders for {len(runs)} visual inputs")
    return pieces[0] + "".join(run + piece for run, piece in zip(runs, pieces[1:]))


def pad_to_batch(values: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Zero-pad ``values`` along ``dim`` to the longest (LLaVA-NeXT's crops per image, read back from image_sizes)."""
    longest = max(v.shape[dim] for v in values)
    out = []
    for v in values:
        shape = list(v.shape)
        shape[dim] = longest - v.shape[dim]
        out.append(torch.cat([v, v.new_zeros(shape)], dim=dim))
    return out


class ScriptLMM(lmms):
    """Shared by the families: argument checks, loading, rank / device, batched greedy generation."""

    model_types: dict[str, str] = {}  # the checkpoint's config.model_type -> transformers class it runs with
    pad_dims: dict[str, int] = {}     # visual inputs zero-padded along this dim when batched (LLaVA-NeXT's crops)
    video_only = False                # every request is a video (frame lists included)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.args, self.params = parse_args(kwargs)  # before anything loads
        import transformers
        from accelerate import Accelerator

        accelerator = Accelerator()
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self.args.device in ("auto", "cuda"):  # one accelerator per process under accelerate launch
            self.device = accelerator.device
        else:
            self.device = torch.device(self.args.device)
        dtype = DTYPES[self.args.dtype]
        model_type = transformers.AutoConfig.from_pretrained(self.args.pretrained).model_type
        if model_type not in self.model_types:
            raise ValueError(f"model_args: pretrained={self.args.pretrained} is a {model_type!r} checkpoint; "
                             f"{type(self).__name__} runs {sorted(self.model_types)}")
        cls = getattr(transformers, self.model_types[model_type])
        self.model = cls.from_pretrained(self.args.pretrained, dtype=dtype,
                                         attn_implementation=self.args.attn_implementation).to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.args.pretrained)
        self.tokenizer.padding_side = "left"
        self.chat_template = self.tokenizer.chat_template or self._processor_chat_template()
        self.prepare()
        pruning = self.pruning()
        if pruning is not None:
            sp.patch.apply(self.model, method=pruning[0], budget=pruning[1], relevance=self.args.relevance,
                           **self.params)
        self.visual_tokens: list[int] = []  # per answered request: visual tokens that reached the LLM

    def _processor_chat_template(self) -> str | None:
        """llava-hf checkpoints keep the chat template beside the processor, not in the tokenizer."""
        import json

        from transformers.utils import cached_file

        for name in ("chat_template.jinja", "chat_template.json"):
            path = cached_file(self.args.pretrained, name, _raise_exceptions_for_missing_entries=False)
            if path:
                text = Path(path).read_text(encoding="utf-8")
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        return None

    def prepare(self) -> None:
        """Family setup after loading (processors, pooling)."""

    def pruning(self) -> tuple[str, int | float] | None:
        """(method, budget) applied to the model, or None to run the stock model (``method=none``)."""
        return None if self.args.method == UNPRUNED else (self.args.method, self.args.budget)

    def encode(self, context: str, visuals: list[Any]) -> tuple[list[int], dict[str, torch.Tensor]]:
        """One request -> (prompt token ids with every visual placeholder, visual tensors for the model)."""
        visuals = list(visuals)
        if self.video_only or is_video(visuals):
            return self.encode_video(context, frames_of(visuals, self.args))
        return self.encode_images(context, images_of(visuals, self.args.image_size))

    def encode_images(self, context: str, images: list[Image.Image]) -> tuple[list[int], dict[str, torch.Tensor]]:
        raise ValueError(f"{type(self).__name__} answers video requests only, got {len(images)} image(s)")

    def encode_video(self, context: str, video: Video) -> tuple[list[int], dict[str, torch.Tensor]]:
        raise ValueError(f"{type(self).__name__} answers image requests only, got a video")

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token model inputs derived from the padded prompt ids (B, L) (Qwen-VL's mm_token_type_ids)."""
        return {}

    def prompt(self, content: list[dict]) -> str:
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    # ----------------------------------------------------------------------------------------- lmms API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        batches = self._batches(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="script generate_until")
        for indices in batches:
            texts = self._generate([requests[i] for i in indices])
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Consecutive runs of up to batch_size requests with the same generation settings."""
        batches: list[list[int]] = []
        last = None
        for i, request in enumerate(requests):
            key = repr(sorted(request.args[1].items()))
            if batches and key == last and len(batches[-1]) < self.args.batch_size:
                batches[-1].append(i)
            else:
                batches.append([i])
            last = key
        return batches

    @torch.no_grad()
    def _generate(self, requests: list[Instance]) -> list[str]:
        gen = dict(requests[0].args[1])
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        prompts, visuals = [], []
        for context, _, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            ids, tensors = self.encode(context, doc_to_visual(self.task_dict[task][split][doc_id]))
            prompts.append(ids)
            visuals.append(tensors)
        inputs = self._collate(prompts, visuals)
        temperature = float(gen.get("temperature", 0) or 0)
        kwargs = dict(max_new_tokens=int(gen.get("max_new_tokens", self.args.max_new_tokens)),
                      num_beams=int(gen.get("num_beams", 1) or 1), do_sample=temperature > 0,
                      pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=gen.get("top_p") or 1.0)
        generated = self.model.generate(**inputs, **kwargs)
        if sp.patch.is_patched(self.model):
            self.visual_tokens.extend(sp.patch.visual_tokens(self.model))
        new = generated[:, inputs["input_ids"].shape[1]:]
        return [until_cut(t, until) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _collate(self, prompts: list[list[int]], visuals: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Left-padded ids and mask (B, L) and the visual tensors concatenated in prompt order."""
        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        kinds = {tuple(sorted(v)) for v in visuals}
        if len(kinds) > 1:
            raise ValueError(f"batch_size > 1 needs requests of one kind (all images or all videos), got inputs "
                             f"{sorted(kinds)} in one batch; use batch_size=1 for mixed tasks")
        for key in visuals[0]:
            values = [v[key] for v in visuals]
            if key in self.pad_dims:
                values = pad_to_batch(values, self.pad_dims[key])
            shapes = {tuple(v.shape[1:]) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"batch_size > 1 needs requests of equal {key} shapes, got {sorted(shapes)} (videos: "
                                 "keep force_sample=True so that every video gives max_frames_num frames)")
            value = torch.cat(values)
            out[key] = value.to(self.device, self.model.dtype if value.is_floating_point() else None)
        out.update({key: value.to(self.device) for key, value in self.token_inputs(ids).items()})
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{type(self).__name__}: loglikelihood is not supported (the paper's tasks "
                                  "all generate; use generate_until tasks)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__}: generate_until_multi_round is not supported")


class ScriptLlavaOnevision(ScriptLMM):
    """LLaVA-Video / LLaVA-OneVision on video tasks; every frame is a pruned row."""

    model_types = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}
    video_only = True

    def prepare(self) -> None:
        from transformers import AutoImageProcessor

        from script_prune.patch.llava_onevision import set_video_pooling

        processor = AutoImageProcessor.from_pretrained(self.args.pretrained)
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        self.side = int(self.model.config.vision_config.image_size)
        set_video_pooling(self.model, self.args.video_pooling)
        self.video_token = self.tokenizer.convert_ids_to_tokens(self.model.config.video_token_index)
        self.per_frame = sp.patch.family_of(self.model).frame_tokens(self.model)

    def pruning(self) -> tuple[str, int | float] | None:
        if self.args.method == UNPRUNED and self.args.video_pooling == "average":
            # the stock forward only pools bilinearly: the patched one keeping every token of every frame
            return "random", self.per_frame
        return super().pruning()

    def encode_video(self, context: str, video: Video) -> tuple[list[int], dict[str, torch.Tensor]]:
        frames = video.frames
        text = self.prompt([{"type": "video"}, {"type": "text", "text": context}])
        run = self.video_token * (frames.shape[0] * self.per_frame + 1)  # + one newline per video
        ids = self.tokenizer(expand(text, self.video_token, [run]), add_special_tokens=False).input_ids
        pixels = normalise_frames(frames, self.side, self.mean, self.std)[None]  # (1, F, 3, S, S)
        return ids, {"pixel_values_videos": pixels}


class ScriptInternVL(ScriptLMM):
    """InternVL3 on image tasks; every tile (and the thumbnail) is a pruned row."""

    model_types = {"internvl": "InternVLForConditionalGeneration"}

    def prepare(self) -> None:
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(self.args.pretrained)
        tok = self.tokenizer
        self.start, self.end = getattr(tok, "start_image_token", "<img>"), getattr(tok, "end_image_token", "</img>")
        self.context = tok.convert_ids_to_tokens(self.model.config.image_token_id)
        self.per_tile = sp.patch.family_of(self.model).row_length(self.model)

    def encode_images(self, context: str, images: list[Image.Image]) -> tuple[list[int], dict[str, torch.Tensor]]:
        processed = self.processor(images=images, return_tensors="pt")
        text = self.prompt([{"type": "image"}] * len(images) + [{"type": "text", "text": context}])
        runs = [self.start + self.context * (self.per_tile * int(n)) + self.end for n in processed["num_patches"]]
        ids = self.tokenizer(expand(text, self.context, runs), add_special_tokens=False).input_ids
        return ids, {"pixel_values": processed["pixel_values"]}


class ScriptQwenVL(ScriptLMM):
    """Qwen2.5-VL / Qwen3-VL on image and video tasks. Rows: every image, and every temporal step of a video
    (two frames: ``temporal_patch_size``), so ``budget`` is tokens (or a fraction) per image / per step.

    Images go through the checkpoint's image processor and the placeholders are expanded here (``image_grid_thw``
    rows of ``h * w / merge**2`` tokens), so image tasks run without torchvision; videos go through the
    checkpoint's full processor (its video processor needs torchvision), which writes Qwen3-VL's frame
    timestamps; frames are sampled by ``script_prune.video`` (``max_frames_num``, ``fps``, ``force_sample``)
    and handed over with their stream positions and rate (``do_sample_frames=False``)."""

    def prepare(self) -> None:
        from transformers import AutoImageProcessor

        self.image_processor = AutoImageProcessor.from_pretrained(self.args.pretrained)
        config = self.model.config
        self.image_token = self.tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.merge = config.vision_config.spatial_merge_size ** 2
        self._video_processor = None

    def video_processor(self) -> Any:
        """The checkpoint's full processor, loaded on the first video request (its video processor needs torchvision)."""
        if self._video_processor is None:
            from transformers import AutoProcessor

            try:
                self._video_processor = AutoProcessor.from_pretrained(self.args.pretrained)
            except ImportError as error:
                raise ImportError(f"{type(self).__name__}: video requests need transformers' video processor, which "
                                  f"needs torchvision (a build matching torch {torch.__version__}); image requests "
                                  "do not") from error
        return self._video_processor

    def encode_images(self, context: str, images: list[Image.Image]) -> tuple[list[int], dict[str, torch.Tensor]]:
        processed = self.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]  # (I, 3): t, h, w in patches
        text = self.prompt([{"type": "image"}] * len(images) + [{"type": "text", "text": context}])
        runs = [self.image_token * n for n in (grid.prod(dim=-1) // self.merge).tolist()]
        ids = self.tokenizer(expand(text, self.image_token, runs), add_special_tokens=False).input_ids
        return ids, {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}

    def encode_video(self, context: str, video: Video) -> tuple[list[int], dict[str, torch.Tensor]]:
        from transformers.video_utils import VideoMetadata

        text = self.prompt([{"type": "video"}, {"type": "text", "text": context}])
        out = self.video_processor()(text=[text], videos=[video.frames],
                                     video_metadata=[VideoMetadata(**video.processor_metadata())],
                                     do_sample_frames=False, return_tensors="pt")
        tensors = {key: torch.as_tensor(out[key]) for key in ("pixel_values_videos", "video_grid_thw",
                                                                "second_per_grid_ts") if key in out}
        return out["input_ids"][0].tolist(), tensors

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        from script_prune.patch.qwen2_5_vl import IMAGE_TYPE, VIDEO_TYPE

        config = self.model.config
        types = (input_ids == config.image_token_id) * IMAGE_TYPE + (input_ids == config.video_token_id) * VIDEO_TYPE
        return {"mm_token_type_ids": types.int()}  # (B, L), as the Qwen processors build it


class ScriptQwen2_5_VL(ScriptQwenVL):
    model_types = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


class ScriptQwen3VL(ScriptQwenVL):
    model_types = {"qwen3_vl": "Qwen3VLForConditionalGeneration"}


class ScriptLlava(ScriptLMM):
    """LLaVA-1.5 and LLaVA-NeXT in transformers' format (``llava-hf/*``) on image tasks, through the checkpoint's
    processor. Rows: LLaVA-1.5 one per image; LLaVA-NeXT the base image and every anyres crop."""

    model_types = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
    pad_dims = {"pixel_values": 1}  # NeXT: (I, crops, 3, S, S), the crop count differs per image size

    def prepare(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.args.pretrained)

    def encode_images(self, context: str, images: list[Image.Image]) -> tuple[list[int], dict[str, torch.Tensor]]:
        text = self.prompt([{"type": "image"}] * len(images) + [{"type": "text", "text": context}])
        out = self.processor(images=images, text=text, return_tensors="pt")
        return out["input_ids"][0].tolist(), {key: out[key] for key in ("pixel_values", "image_sizes") if key in out}
