"""Shared machinery of the answer generators (model_vqa_loader, model_vqa, model_vqa_science, model_vqa_mmbench).

- `add_generation_args`: LLaVA's flags plus `--visual-token-num` (alias `--visual_token_num`),
  `--pruning-method` (a `script_prune` method or "none"), `--pruning-param key=value` (repeatable; the
  value is read as JSON when it parses, e.g. `tau=0.1`, `negate=false`, else kept as a string),
  `--device`, `--dtype`, `--num-workers`, `--attn-implementation`, `--on-image-error`, `--merge-from`,
  `--batch-size`, `--group-by-length`.
- `split_list` / `get_chunk`: contiguous chunks of ceil(len / n) items (LLaVA's sharding).
- `ResumableJsonlWriter`: the one writer of an answers file (an exclusive lock beside it); on open it
  drops a truncated last line left by a killed run (a corrupt line anywhere else is an error) and
  remembers the keys already written, so a rerun skips them and never duplicates a line.
- `run_fingerprint`: every setting that changes an answer; stored in each answer's metadata, and a
  resumed file must carry the current one (`check_same_run` lists the differing fields otherwise).
- `merge_answers`: chunk files -> one file in question order holding exactly the question set.
- `run_generation`: checks all of the above before the model loads, then tokenises the prompts, loads
  images in a DataLoader, generates greedily (by default) in left-padded batches of `--batch-size`
  questions (`batch_order`, `generate_answers`) and writes `{question_id, prompt, text, answer_id, model_id,
  metadata}` lines in question order with a tqdm bar that shows the visual token count reaching the LLM.

Testing hook: with the environment variable LLAVA_EVAL_CRASH_AFTER=N a run writes N answers, then half
of the next line, and exits with status 75 without cleanup (what a kill mid-write leaves behind).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llava.eval.io_utils import FileLock, atomic_write_jsonl, require_path

CRASH_ENV = "LLAVA_EVAL_CRASH_AFTER"
CRASH_EXIT_CODE = 75
DTYPES = ("float16", "bfloat16", "float32")
LENGTH_WINDOW_BATCHES = 16  # --group-by-length sorts within windows of this many batches


# ----------------------------------------------------------------------------- sharding
def split_list(items: Sequence, n: int) -> list[list]:
    """Contiguous chunks of ceil(len(items) / n) items (fewer than n chunks when items are few)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_chunks: expected an int >= 1, got {n!r}")
    size = max(1, math.ceil(len(items) / n))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def get_chunk(items: Sequence, n: int, k: int) -> list:
    """Chunk `k` of `split_list(items, n)`; empty when that chunk does not exist."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
        raise ValueError(f"chunk_idx: expected an int in [0, {n}), got {k!r}")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


# ----------------------------------------------------------------------------- answers files
def answer_key(row: dict) -> str:
    """Identity of an answer line: question_id, round_id (MMBench) and prompt.

    The prompt is part of the key because some question files reuse a question_id for several questions
    (LLaVA's TextVQA file uses the image id as question_id).
    """
    return json.dumps([row["question_id"], row.get("round_id", 0), row.get("prompt", "")], ensure_ascii=False)


@dataclass
class AnswerLines:
    """The answer lines of a file: (line number, row) in file order, and where a truncated last line starts."""

    path: Path
    rows: list[tuple[int, dict]]
    truncated_at: int | None  # byte offset of a last line without its newline (a run killed mid-write)


def scan_answers(path: str | os.PathLike) -> AnswerLines:
    """Read an answers file strictly.

    A last line without its newline is what a kill mid-write leaves: it is reported in `truncated_at`, not
    parsed. Any other line that is not a JSON object with a question_id is a ValueError naming the file and
    line: a corrupt line in the middle is never dropped, and neither is anything after it.
    """
    p = Path(path)
    data = p.read_bytes() if p.exists() else b""
    rows: list[tuple[int, dict]] = []
    pos, lineno = 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            return AnswerLines(p, rows, pos)
        lineno += 1
        line = data[pos:nl].strip()
        pos = nl + 1
        if not line:
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"answers file {p} line {lineno} is not valid JSON ({getattr(err, 'msg', err)}); only a truncated last line (a run "
                "killed mid-write) is repaired automatically. Fix or delete that line, or delete the file to "
                "start over") from None
        if not isinstance(row, dict) or "question_id" not in row:
            raise ValueError(f"answers file {p} line {lineno} is not an answer line (a JSON object with a question_id)")
        rows.append((lineno, row))
    return AnswerLines(p, rows, None)


def index_answers(lines: AnswerLines, key: Callable[[dict], str] = answer_key) -> dict[str, tuple[int, dict]]:
    """key -> (line number, row); a key written twice is a ValueError naming both lines."""
    index: dict[str, tuple[int, dict]] = {}
    for lineno, row in lines.rows:
        k = key(row)
        if k in index:
            raise ValueError(f"answers file {lines.path} line {lineno} repeats the answer of line {index[k][0]} "
                             f"(question key {k}); an answers file holds one line per question")
        index[k] = (lineno, row)
    return index


class ResumableJsonlWriter:
    """Append-only jsonl writer that resumes an interrupted file, the only writer of that file.

    Opening takes an exclusive lock on `<path>.lock` (FileLockedError naming the holder when another process
    writes the file), then repairs the file: a truncated last line (a run killed mid-write) is cut off; a
    corrupt line anywhere else is an error. `answers` maps the keys already present to their line (-1 for
    lines of this session); `runs` is `answer_runs` of the lines read (the rows themselves are not kept).
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], str] = answer_key):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.path, "answers file").acquire()
        try:
            lines = scan_answers(self.path)
            index = index_answers(lines, key)
            self.runs = answer_runs(index.values())
            self.answers = {k: lineno for k, (lineno, _) in index.items()}
            self.repaired = lines.truncated_at is not None
            if self.repaired:
                with open(self.path, "r+b") as f:
                    f.truncate(lines.truncated_at)
            self._f = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self._lock.release()
            raise

    @property
    def done(self) -> set[str]:
        return set(self.answers)

    def __contains__(self, row_or_key: dict | str) -> bool:
        k = row_or_key if isinstance(row_or_key, str) else self.key(row_or_key)
        return k in self.answers

    def write(self, row: dict) -> None:
        k = self.key(row)
        if k in self.answers:
            return
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.answers[k] = -1

    def write_partial_and_die(self, row: dict) -> None:
        """Testing hook: write half of `row`'s line and exit at once (like a kill mid-write)."""
        text = json.dumps(row, ensure_ascii=False)
        self._f.write(text[: max(1, len(text) // 2)])
        self._f.flush()
        os._exit(CRASH_EXIT_CODE)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._lock.release()

    def __enter__(self) -> "ResumableJsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- run fingerprint
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def samples_sha256(samples: Sequence["EvalSample"]) -> str:
    """Hash of the questions as asked: key, full question text (instruction lines included), relevance query
    and image file name of every sample, in order (captures --single-pred-prompt, --lang, --all-rounds)."""
    h = hashlib.sha256()
    for s in samples:
        image = getattr(s.load_image, "name", None) if s.load_image is not None else None
        h.update(json.dumps([s.key, s.question, s.query, image], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("script-prune", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def run_fingerprint(args: argparse.Namespace, pruning, samples: Sequence["EvalSample"]) -> dict:
    """Every setting that changes an answer (see EVAL.md, "Run fingerprint"); stored in each answer's metadata."""
    from llava.model.builder import checkpoint_digest

    model_path = os.path.expanduser(args.model_path)
    _, dtype = resolve_device_dtype(args.device, args.dtype)
    decoding = {k: v for k, v in generation_kwargs(args).items() if k != "use_cache"}
    return {
        "model_path": os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
        "model_sha256": checkpoint_digest(model_path),
        "method": pruning.method if pruning is not None else "none",
        "budget": args.visual_token_num,
        "params": dict(pruning.params) if pruning is not None else {},
        "negate": pruning.method_params().get("negate") if pruning is not None else None,
        "conv_mode": args.conv_mode,
        "decoding": decoding,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn_implementation,
        "question_file_sha256": file_sha256(args.question_file),
        "questions_sha256": samples_sha256(samples),
        "versions": _versions(),
    }


def fingerprint_id(fingerprint: dict) -> str:
    """Short, stable id of a fingerprint (16 hex digits of the sha256 of its sorted JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`field: old -> new` for every field (nested ones dotted) that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict) and k != "params":
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} in the file, {json.dumps(b)} in this run")
    return out


def answer_runs(rows) -> dict[str | None, tuple[int, dict | None]]:
    """Fingerprint id -> (first line, run fields) over (line, answer row) pairs; id None: no fingerprint."""
    runs: dict[str | None, tuple[int, dict | None]] = {}
    for lineno, row in rows:
        meta = row.get("metadata") or {}
        fid = meta.get("fingerprint") if "run" in meta else None
        if fid not in runs or lineno < runs[fid][0]:
            runs[fid] = (lineno, meta.get("run"))
    return runs


def check_same_run(path: Path, runs: dict[str | None, tuple[int, dict | None]], fingerprint: dict) -> None:
    """Every answer of `path` (its `answer_runs`) must carry `fingerprint`; else a ValueError listing the
    differing fields."""
    fid = fingerprint_id(fingerprint)
    for other, (lineno, run) in sorted(runs.items(), key=lambda item: item[1][0]):
        if other == fid:
            continue
        if run is None:
            raise ValueError(
                f"{path} line {lineno} has no run fingerprint (written by an older version of this harness), so "
                "its settings cannot be checked against this run; delete or move the file to start over")
        diff = fingerprint_diff(run, fingerprint) or [f"fingerprint: {other} != {fid}"]
        raise ValueError(
            f"{path} holds answers of another run (line {lineno}); differing settings:\n  " + "\n  ".join(diff)
            + "\nWrite to another file (scripts: set RUN_TAG) or delete this one; a resumed file never mixes settings")


def check_unique_questions(samples: Sequence["EvalSample"], question_file: str) -> None:
    """Two questions with one key (question_id, round, prompt) would share one answer: an error naming both."""
    seen: dict[str, EvalSample] = {}
    for s in samples:
        if s.key in seen:
            raise ValueError(
                f"question file {question_file}: {s.origin or 'a question'} repeats the question key "
                f"(question_id, round, prompt) {s.key} of {seen[s.key].origin or 'an earlier question'}; "
                "each question needs its own key, or one of them would be silently skipped")
        seen[s.key] = s


# ----------------------------------------------------------------------------- arguments
def parse_pruning_params(items: Sequence[str] | None) -> dict[str, Any]:
    """`["tau=0.1", "negate=false", "kernel=cos"]` -> `{"tau": 0.1, "negate": False, "kernel": "cos"}`."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--pruning-param: expected key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def add_generation_args(parser: argparse.ArgumentParser, *, max_new_tokens: int, conv_mode: str = "vicuna_v1") -> None:
    import script_prune

    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", default=conv_mode)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--visual-token-num", "--visual_token_num", dest="visual_token_num", type=int, default=576,
                        help="visual tokens kept per image row (LLaVA-NeXT: per crop)")
    parser.add_argument("--pruning-method", default="script", choices=["none"] + list(script_prune.list_methods()),
                        help="token selection method from script_prune, or 'none' for the unpruned model")
    parser.add_argument("--pruning-param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter (repeatable), e.g. --pruning-param tau=0.1")
    parser.add_argument("--no-negate-relevance", dest="negate_relevance", action="store_false",
                        help="use the raw CLIP relevance (default: negated, as the authors' release)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--num-workers", type=int, default=None, help="image loading workers (default 4 on GPU, 0 on CPU)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="questions per generate call (left-padded; greedy answers equal those of batch 1)")
    parser.add_argument("--group-by-length", action="store_true",
                        help="batch questions of similar prompt length (sorted within windows of "
                             f"{LENGTH_WINDOW_BATCHES} batches; answers are still written in question order)")
    parser.add_argument("--on-image-error", default="stop", choices=["stop", "record"],
                        help="an unreadable image: stop the run naming it (default), or record an answer flagged "
                             "with 'error' (empty text, counted wrong, listed in the summary) and go on")
    parser.add_argument("--merge-from", nargs="+", default=None, metavar="CHUNK_FILE",
                        help="instead of answering: merge these chunk answer files into --answers-file, in question "
                             "order, checking that they hold exactly the question set of one run")


def resolve_device_dtype(device: str | None, dtype: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "float32" if device == "cpu" else "float16"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {DTYPES}, got {dtype!r}")
    return torch.device(device), getattr(torch, dtype)


def pruning_config_from_flags(method: str, visual_token_num: int, param_items: Sequence[str] | None,
                              no_negate_relevance: bool):
    """PruningConfig of the CLI flags (checked here, before any model loads).

    `--pruning-param negate=true` together with `--no-negate-relevance` is a contradiction, refused.
    """
    from llava.model.pruning import PruningConfig

    params = parse_pruning_params(param_items)
    if no_negate_relevance and params.get("negate") is True:
        raise ValueError("--pruning-param negate=true contradicts --no-negate-relevance; give only one of them")
    return PruningConfig(method=method, visual_token_num=visual_token_num, params=params,
                         negate_relevance=not no_negate_relevance)


def build_pruning_config(args: argparse.Namespace):
    """PruningConfig from the flags, or None for --pruning-method none."""
    if args.pruning_method == "none":
        if args.pruning_param:
            raise ValueError("--pruning-param: not allowed with --pruning-method none")
        return None
    return pruning_config_from_flags(args.pruning_method, args.visual_token_num, args.pruning_param,
                                     not args.negate_relevance)


# ----------------------------------------------------------------------------- samples and prompts
@dataclass
class EvalSample:
    """One question to answer.

    question: the user text without the image tag (the tag is added when `load_image` is set).
    prompt_field: what the answer line stores as "prompt".
    load_image: returns the PIL image; None for a text-only question.
    query: the text given to the pruning method's relevance (instruction lines removed).
    extra: additional answer-line fields (MMBench: round_id, options, option_char).
    origin: where the question comes from in its file (e.g. "line 7"), for error messages.
    """

    question_id: Any
    question: str
    prompt_field: str
    load_image: Callable[[], Any] | None
    query: str
    extra: dict = field(default_factory=dict)
    origin: str = ""

    @property
    def key(self) -> str:
        return answer_key({"question_id": self.question_id, "prompt": self.prompt_field, **self.extra})


def build_prompt(question: str, has_image: bool, conv_mode: str, mm_use_im_start_end: bool) -> str:
    """The full chat prompt: system + USER turn (image tag first when there is an image) + empty ASSISTANT turn."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"--conv-mode: expected one of {sorted(conv_templates)}, got {conv_mode!r}")
    if has_image:
        tag = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end else DEFAULT_IMAGE_TOKEN
        question = tag + "\n" + question
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@dataclass(frozen=True)
class ImageFile:
    """Picklable image source (DataLoader workers): `folder/name` opened as RGB."""

    folder: str
    name: str

    def __call__(self):
        from PIL import Image

        with Image.open(require_path(Path(self.folder) / self.name, "image")) as im:
            return im.convert("RGB")

    def __str__(self) -> str:
        return str(Path(self.folder) / self.name)


def image_file_loader(image_folder: str, image_file: str) -> ImageFile:
    """A callable that opens `image_folder/image_file` as RGB."""
    return ImageFile(str(image_folder), str(image_file))


def check_images_exist(image_folder: str, image_files: Sequence[str]) -> None:
    """Fail before loading the model when the image folder or any image is missing."""
    folder = require_path(image_folder, "image folder (--image-folder)", is_dir=True)
    for name in image_files:
        require_path(folder / name, "image")


@dataclass
class PreparedQuestion:
    """One prepared question: its position in the run's question list, input_ids (L,), the image's views
    ((3, S, S) or NeXT (V, 3, S, S); None without image) and size, or the error that reading its image raised."""

    position: int
    sample: EvalSample
    input_ids: Any
    views: Any = None
    image_size: Any = None
    image_error: str | None = None


class SampleDataset:
    """Torch-style dataset of `PreparedQuestion`s (image reading errors are caught and returned, not raised)."""

    def __init__(self, samples: list[EvalSample], tokenizer, image_processor, model_config, conv_mode: str):
        self.samples, self.tokenizer, self.image_processor = samples, tokenizer, image_processor
        self.model_config, self.conv_mode = model_config, conv_mode

    def __len__(self) -> int:
        return len(self.samples)

    def prompt_ids(self, i: int):
        """Prompt token ids (L,) of sample `i`, with IMAGE_TOKEN_INDEX where the image goes."""
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        s = self.samples[i]
        prompt = build_prompt(s.question, s.load_image is not None, self.conv_mode,
                              bool(getattr(self.model_config, "mm_use_im_start_end", False)))
        return tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    def __getitem__(self, i: int):
        from llava.mm_utils import process_images

        s = self.samples[i]
        input_ids = self.prompt_ids(i)
        if s.load_image is None:
            return PreparedQuestion(i, s, input_ids)
        try:
            image = s.load_image()
            pixels = process_images([image], self.image_processor, self.model_config)
        except Exception as err:  # noqa: BLE001 - any failure to read or decode the image
            error = f"cannot read the image {s.load_image} of question {s.question_id!r} ({type(err).__name__}: {err})"
            return PreparedQuestion(i, s, input_ids, image_error=error)
        return PreparedQuestion(i, s, input_ids, pixels[0], image.size)  # process_images' batch of one -> its views


def _as_list(batch):
    return list(batch)


def batch_order(lengths: Sequence[int], batch_size: int, group_by_length: bool) -> list[list[int]]:
    """Batches of positions: consecutive runs of `batch_size`, or with `group_by_length` the positions of
    each window of LENGTH_WINDOW_BATCHES batches sorted by length (longest first, ties in question order)
    and cut into batches. A window bounds how far answers wait to be written in question order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {batch_size!r}")
    positions = list(range(len(lengths)))
    if group_by_length:
        window = batch_size * LENGTH_WINDOW_BATCHES
        positions = [p for start in range(0, len(positions), window)
                     for p in sorted(positions[start:start + window], key=lambda q: -lengths[q])]
    return [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]


# ----------------------------------------------------------------------------- the generation loop
def load_model(args: argparse.Namespace):
    """(tokenizer, model, image_processor, model_name) with the pruning setting of the flags."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, model_name, device=str(device), torch_dtype=dtype,
        attn_implementation=args.attn_implementation, pruning=build_pruning_config(args),
    )
    return tokenizer, model, image_processor, model_name


def _strip_prompt_ids(output_ids, input_ids):
    """Generated ids only (some generate paths return the prompt too)."""
    n = input_ids.shape[1]
    if output_ids.shape[1] > n and bool((output_ids[:, :n] == input_ids.to(output_ids.device)).all()):
        return output_ids[:, n:]
    return output_ids


def left_pad(rows: Sequence, pad_id: int):
    """Prompt ids of different lengths (L_i,) -> ids (B, L) padded on the left with `pad_id` and the
    attention mask (B, L) (1 on real tokens)."""
    import torch

    length = max(r.numel() for r in rows)
    ids = rows[0].new_full((len(rows), length), pad_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - r.numel():] = r
        mask[b, length - r.numel():] = 1
    return ids, mask


def generation_kwargs(args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "use_cache": True}
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature)
        if args.top_p is not None:
            kw["top_p"] = args.top_p
    else:
        kw["do_sample"] = False
    return kw


def generate_answers(model, tokenizer, items: Sequence[PreparedQuestion], gen_kwargs: dict) -> list[tuple[str, int]]:
    """Greedy (or sampled) answer text and the number of visual tokens that reached the LLM (0 without image)
    for each item, in one left-padded generate call; the items either all have an image or none has."""
    param = next(model.parameters())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask = left_pad([it.input_ids for it in items], pad_id)
    input_ids, mask = input_ids.to(param.device), mask.to(param.device)  # (B, L)
    extra_inputs: dict[str, Any] = {}
    with_images = items[0].views is not None
    if with_images:
        extra_inputs = {"images": [it.views.to(device=param.device, dtype=param.dtype) for it in items],
                        "image_sizes": [it.image_size for it in items], "texts": [it.sample.query for it in items]}
    output_ids = model.generate(input_ids, attention_mask=mask, **extra_inputs, **gen_kwargs)
    texts = tokenizer.batch_decode(_strip_prompt_ids(output_ids, input_ids), skip_special_tokens=True)
    counts = getattr(model, "last_visual_token_counts", None) if with_images else None
    return [(text.strip(), int(counts[b]) if counts else 0) for b, text in enumerate(texts)]


def _answer_line(sample: EvalSample, text: str, model_id: str, fingerprint: dict, visual_tokens: int,
                 error: str | None = None) -> dict:
    """`{question_id, [round_id,] prompt, text, [options, option_char,] answer_id, model_id, metadata[, error]}`.

    metadata: method, budget, params, visual_tokens, the run `fingerprint` (its id) and `run` (its fields).
    """
    extra = dict(sample.extra)
    head = {"question_id": sample.question_id}
    if "round_id" in extra:
        head["round_id"] = extra.pop("round_id")
    row = {
        **head, "prompt": sample.prompt_field, "text": text, **extra,
        "answer_id": uuid.uuid4().hex, "model_id": model_id,
        "metadata": {"method": fingerprint["method"], "budget": fingerprint["budget"], "params": fingerprint["params"],
                     "visual_tokens": visual_tokens, "fingerprint": fingerprint_id(fingerprint), "run": fingerprint},
    }
    if error is not None:
        row["error"] = error
    return row


DRIVER_ENV = "LLAVA_EVAL_DRIVER_PID"


def watch_driver(poll_s: float = 0.5) -> None:
    """With LLAVA_EVAL_DRIVER_PID set (scripts/lib/eval_common.sh sets it to the bash driver's pid), end this
    process as soon as the driver is gone, however it died (even SIGKILL): no orphaned writer keeps going."""
    raw = os.environ.get(DRIVER_ENV, "")
    if not raw.isdigit():
        return
    pid = int(raw)

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        print(f"[eval] the driver (pid {pid}) is gone: stopping this answer generator", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _first_keys(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def merge_answers(chunk_files: Sequence[str], merged_file: str, samples: Sequence[EvalSample], fingerprint: dict) -> int:
    """Write the answers of `chunk_files` to `merged_file` in question order; returns the number of lines.

    The chunks must hold exactly one answer per question of `samples` (none missing, none twice, none unknown),
    all of this run (`fingerprint`), and no truncated line; otherwise a ValueError says what is wrong.
    """
    answers: dict[str, tuple[str, int, dict]] = {}
    for path in chunk_files:
        lines = scan_answers(require_path(path, "chunk answers file"))
        if lines.truncated_at is not None:
            raise ValueError(f"chunk answers file {path} ends with a truncated line: its run did not finish "
                             "(rerun to resume)")
        index = index_answers(lines)
        check_same_run(Path(path), answer_runs(index.values()), fingerprint)
        for k, (lineno, row) in index.items():
            if k in answers:
                raise ValueError(f"question key {k} is answered twice: {answers[k][0]} line {answers[k][1]} and "
                                 f"{path} line {lineno}")
            answers[k] = (path, lineno, row)
    wanted = [s.key for s in samples]
    missing = [k for k in wanted if k not in answers]
    unknown = sorted(set(answers) - set(wanted))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(wanted)} questions have no answer (first: {_first_keys(missing)}; "
                         "rerun to resume)")
        if unknown:
            parts.append(f"{len(unknown)} answers are to questions not in the question file "
                         f"(first: {_first_keys(unknown)})")
        raise ValueError(f"cannot merge {list(chunk_files)} into {merged_file}: " + "; ".join(parts))
    atomic_write_jsonl(merged_file, (answers[k][2] for k in wanted))
    return len(wanted)


def run_generation(args: argparse.Namespace, samples: list[EvalSample]) -> int:
    """Answer this process's chunk of `samples` into `--answers-file`; returns the number of new answers.

    Everything that can be checked without the model is checked first: the flags, unique question keys, the
    lock (one writer per answers file) and that the file holds only answers of this run's fingerprint.
    With `--merge-from` the chunk files are merged instead (see `merge_answers`).
    """
    import torch
    from tqdm import tqdm

    pruning = build_pruning_config(args)  # validate the flags even when there is nothing left to answer
    batch_order([], args.batch_size, args.group_by_length)  # checks --batch-size
    check_unique_questions(samples, args.question_file)
    fingerprint = run_fingerprint(args, pruning, samples)
    answers_file = os.path.expanduser(args.answers_file)
    if args.merge_from:
        n = merge_answers(args.merge_from, answers_file, samples, fingerprint)
        print(f"[merge] {n} answers from {len(args.merge_from)} chunk file(s) -> {answers_file}", file=sys.stderr)
        return 0
    watch_driver()
    chunk = get_chunk(samples, args.num_chunks, args.chunk_idx)
    writer = ResumableJsonlWriter(answers_file)
    try:
        check_same_run(writer.path, writer.runs, fingerprint)
        chunk_keys = {s.key for s in chunk}
        foreign = [k for k in writer.answers if k not in chunk_keys]
        if foreign:
            raise ValueError(
                f"--answers-file {answers_file} holds {len(foreign)} answers to questions outside chunk "
                f"{args.chunk_idx} of {args.num_chunks} of {args.question_file} (first: {_first_keys(foreign)}); "
                "use one file per chunk, or delete it")
    except BaseException:
        writer.close()
        raise
    todo = [s for s in chunk if s.key not in writer]
    if writer.repaired:
        print(f"[resume] dropped a truncated last line of {answers_file} (a run killed mid-write)", file=sys.stderr)
    if len(todo) < len(chunk):
        print(f"[resume] {len(chunk) - len(todo)} of {len(chunk)} answers already in {answers_file}", file=sys.stderr)
    if not todo:
        writer.close()
        return 0
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)

    try:
        tokenizer, model, image_processor, model_name = load_model(args)
    except BaseException:
        writer.close()
        raise
    on_gpu = next(model.parameters()).device.type == "cuda"
    num_workers = args.num_workers if args.num_workers is not None else (4 if on_gpu else 0)
    dataset = SampleDataset(todo, tokenizer, image_processor, model.config, args.conv_mode)
    lengths = [dataset.prompt_ids(i).numel() for i in range(len(todo))] if args.group_by_length else [0] * len(todo)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_order(lengths, args.batch_size, args.group_by_length),
                                         num_workers=num_workers, collate_fn=_as_list)
    gen_kwargs = generation_kwargs(args)
    written, pending = 0, {}  # pending: position -> answer line, written once every earlier position is
    bar = tqdm(total=len(chunk), initial=len(chunk) - len(todo),
               desc=f"{model_name} {fingerprint['method']}@{args.visual_token_num}", dynamic_ncols=True)
    with writer, torch.inference_mode():
        for batch in loader:
            failed = [it for it in batch if it.image_error is not None]
            stop = failed and args.on_image_error != "record"
            if stop:   # answer what comes before the first unreadable image, as batch 1 would, then stop
                batch = [it for it in batch if it.position < min(f.position for f in failed)]
            else:
                for it in failed:
                    print(f"[image error] {it.image_error}: recorded as a failed answer", file=sys.stderr)
                    pending[it.position] = _answer_line(it.sample, "", model_name, fingerprint, 0, it.image_error)
            for group in ([it for it in batch if it.image_error is None and it.views is not None],
                          [it for it in batch if it.image_error is None and it.views is None]):
                if group:
                    for it, (text, visual_tokens) in zip(group, generate_answers(model, tokenizer, group, gen_kwargs)):
                        pending[it.position] = _answer_line(it.sample, text, model_name, fingerprint, visual_tokens)
                        bar.set_postfix(visual_tokens=visual_tokens)
            while written in pending:   # question order: positions 0, 1, ... of `todo`
                row = pending.pop(written)
                if crash_after and written >= crash_after:
                    writer.write_partial_and_die(row)
                writer.write(row)
                written += 1
                bar.update(1)
            if stop:
                first = min(failed, key=lambda it: it.position)
                raise RuntimeError(
                    f"{first.image_error}. The {len(writer.answers)} answers written so far are kept in "
                    f"{answers_file}: fix or replace the image and rerun to resume, or rerun with "
                    "--on-image-error record to record this question as a failed answer and go on")
    bar.close()
    return written
