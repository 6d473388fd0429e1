"""Video files -> uniformly sampled RGB frames for the video families (LLaVA-Video, Qwen-VL), with PyAV.

``load_video(path, max_frames_num=64, fps=1.0, force_sample=False)`` follows the sampling LLaVA-Video's
and lmms-eval's loaders describe: one frame per ``1 / fps`` seconds of the stream; when that gives more
than ``max_frames_num`` frames, or ``force_sample`` is set, ``max_frames_num`` frames evenly spaced from
the first to the last frame instead. Needs the optional ``av`` package (``pip install script-prune[video]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Video", "load_video", "sample_indices"]


@dataclass
class Video:
    """frames: (N, H, W, 3) uint8 RGB; times: (N,) seconds of each frame; duration: seconds of the stream;
    indices: (N,) positions of the frames in the stream; rate: the stream's average frames per second."""

    frames: np.ndarray
    times: np.ndarray
    duration: float
    indices: np.ndarray
    rate: float

    def processor_metadata(self) -> dict:
        """The frames as transformers' video processors take them (``video_metadata``, with
        ``do_sample_frames=False``): the stream's frame count and rate and each frame's index in it, so the
        frame times a processor derives (Qwen3-VL's timestamps, Qwen2.5-VL's ``second_per_grid_ts``) are the
        file's."""
        height, width = self.frames.shape[1:3]
        return dict(total_num_frames=round(self.duration * self.rate), fps=self.rate, width=width, height=height,
                    duration=self.duration, frames_indices=self.indices.tolist())


def sample_indices(total: int, average_fps: float, max_frames_num: int, fps: float = 1.0,
                   force_sample: bool = False) -> np.ndarray:
    """Frame indices to keep out of ``total`` frames: every ``round(average_fps / fps)``-th, or
    ``max_frames_num`` evenly spaced ones (first and last included) when there would be more or when forced."""
    if total < 1 or max_frames_num < 1:
        raise ValueError(f"need at least one frame and max_frames_num >= 1, got total={total}, "
                         f"max_frames_num={max_frames_num}")
    step = max(1, round(average_fps / fps))
    indices = np.arange(0, total, step)
    if force_sample or indices.shape[0] > max_frames_num:
        indices = np.linspace(0, total - 1, max_frames_num).astype(np.int64)
    return indices


def load_video(path: str | Path, max_frames_num: int = 64, fps: float = 1.0, force_sample: bool = False) -> Video:
    """Decode ``path`` and keep the frames :func:`sample_indices` picks; a clear ValueError naming the file when it
    cannot be read or holds no video frames."""
    try:
        import av
    except ImportError as error:  # pragma: no cover - the optional dependency
        raise ImportError("script_prune.video needs PyAV: pip install 'script-prune[video]'") from error
    path = Path(path)
    try:
        with av.open(str(path)) as container:  # pass 1: frame count and rate (decoded when the header has none)
            if not container.streams.video:
                raise ValueError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            average = float(stream.average_rate or stream.guessed_rate or 1)
            total = stream.frames or sum(1 for _ in container.decode(stream))
        if total < 1:
            raise ValueError(f"video {path} holds no decodable frames")
        indices = sample_indices(total, average, max_frames_num, fps, force_sample)
        wanted, frames = set(indices.tolist()), {}
        with av.open(str(path)) as container:  # pass 2: only the sampled frames become arrays
            for position, frame in enumerate(container.decode(container.streams.video[0])):
                if position in wanted:
                    frames[position] = frame.to_ndarray(format="rgb24")
                if position >= indices[-1]:
                    break
    except (OSError, av.FFmpegError) as error:
        raise ValueError(f"cannot read video {path}: {error}") from error
    missing = sorted(wanted - frames.keys())
    if missing:  # a header frame count above what decodes
        raise ValueError(f"video {path}: frames {missing[:3]} of {total} could not be decoded")
    return Video(np.stack([frames[i] for i in indices.tolist()]), indices / average, total / average, indices, average)
