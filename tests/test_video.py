"""script_prune.video: a synthetic clip written with PyAV decodes back to N uniformly sampled frames, and those
frames become LLaVA-Video rows with the per-frame budget (skipped without the optional ``av``)."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

import script_prune as sp  # noqa: E402
from script_prune.video import load_video, sample_indices  # noqa: E402
from tests.test_patch_llava_onevision import SIZE, VIDEO, build, left_padded  # noqa: E402
from script_prune.patch import LlavaOnevisionFamily  # noqa: E402
from tests.helpers import skip_below_family_minimum  # noqa: E402

FRAMES, RATE = 24, 8  # 3 seconds


def write_clip(path, frames=FRAMES, rate=RATE):
    """Frame i is a flat grey of level 10 * i (mpeg4 at high quality keeps it within a few levels)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            image = np.full((SIZE, SIZE, 3), 10 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_sampling_one_per_second_or_uniform():
    assert sample_indices(24, 8.0, 64).tolist() == [0, 8, 16]  # 1 fps
    assert sample_indices(24, 8.0, 2).tolist() == [0, 23]  # more than max_frames_num: uniform, ends included
    assert sample_indices(24, 8.0, 4, force_sample=True).tolist() == [0, 7, 15, 23]
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 8.0, 4)


def test_decode_a_written_clip_and_errors_name_the_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path)
    video = load_video(path, max_frames_num=4, force_sample=True)
    assert video.frames.shape == (4, SIZE, SIZE, 3) and video.frames.dtype == np.uint8
    levels = video.frames.reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(levels, [0, 70, 150, 230], atol=6)  # frames 0, 7, 15, 23
    np.testing.assert_allclose(video.times, [0, 7 / 8, 15 / 8, 23 / 8])
    assert video.duration == pytest.approx(3.0)
    # as transformers' video processors take it: 24 frames at 8 fps, the sampled frames at their stream positions
    assert video.processor_metadata() == dict(total_num_frames=24, fps=pytest.approx(8.0), width=SIZE, height=SIZE,
                                              duration=pytest.approx(3.0), frames_indices=[0, 7, 15, 23])
    assert load_video(path).frames.shape[0] == 3  # 1 fps
    with pytest.raises(ValueError, match="cannot read video .*missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "noise.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="noise.mp4"):
        load_video(tmp_path / "noise.mp4")


@torch.no_grad()
@skip_below_family_minimum(LlavaOnevisionFamily())
def test_decoded_frames_are_rows_with_the_per_frame_budget(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path)
    frames = load_video(path, max_frames_num=4, force_sample=True).frames  # (4, S, S, 3)
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[None] / 127.5 - 1.0  # (1, 4, 3, S, S)
    model = build()
    ids, mask = left_padded([[1, 5] + [VIDEO] * (4 * 9 + 1) + [6, 7]])
    sp.patch.apply(model, method="script", budget=3)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, max_new_tokens=3,
                         do_sample=False)
    assert [len(k) for k in sp.patch.kept(model)] == [3] * 4  # one row per decoded frame, 3 tokens each
    assert out.shape == (1, ids.shape[1] + 3)
    sp.patch.remove(model)
