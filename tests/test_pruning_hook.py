"""Acceptance 2: the pruned path is exact.

Vision features are planted (the tower's output is replaced), the LLM's input embeddings are captured,
and compared with what a slow reference builds from the indices ``script_prune`` returns: projected
features of those indices, in order, with LLaVA-NeXT newlines placed by a loop-over-grid reference.
"""

import pytest
import torch

import script_prune as sp
from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.clip_encoder import VisionOutput
from llava.model.pruning import PruningConfig
from tests.helpers import prompt_ids, random_image


@pytest.fixture(scope="module")
def llava15(tiny_llava15_path):
    return load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next_path):
    return load_pretrained_model(tiny_llava_next_path, torch_dtype=torch.float32)


class Capture:
    """Records the kwargs the LLM base model receives (inputs_embeds, position_ids, attention_mask)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.get_model().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def plant_features(monkeypatch, model, features: torch.Tensor) -> None:
    """Make the vision tower return `features` (R, N, C) whatever the pixels are."""
    tower = model.get_vision_tower()
    monkeypatch.setattr(tower, "forward", lambda images, with_attention=False: VisionOutput(features.clone()))


def image_span(ids: torch.Tensor) -> int:
    return int((ids == -200).nonzero()[0, 0])


# ------------------------------------------------------------------------------------------ LLaVA-1.5
def test_llava15_pruned_embeddings_are_projected_selected_features(llava15, monkeypatch):
    tokenizer, model, processor, _ = llava15
    torch.manual_seed(0)
    tower = model.get_vision_tower()
    planted = torch.randn(1, tower.num_patches, tower.hidden_size)  # (1, 16, C)
    plant_features(monkeypatch, model, planted)
    ids = prompt_ids(tokenizer, "What is it?")
    pixels = process_images([random_image(60, 50)], processor, model.config)
    budget = 5
    model.set_pruning(PruningConfig(method="gsp", visual_token_num=budget))
    try:
        with Capture(model) as cap, torch.no_grad():
            model(ids[None], images=pixels, image_sizes=[(60, 50)])
    finally:
        model.set_pruning(None)
    embeds, positions = cap.calls[0]["inputs_embeds"][0], cap.calls[0]["position_ids"][0]
    with torch.no_grad():
        projected = model.get_model().mm_projector(planted)[0]  # (16, D)
        text = model.get_model().embed_tokens(ids.clamp(min=0))
    expected_idx = sp.select(projected, budget, "gsp")
    at = image_span(ids)
    assert embeds.shape[0] == ids.numel() - 1 + budget
    torch.testing.assert_close(embeds[at:at + budget], projected[expected_idx], atol=0, rtol=0)
    torch.testing.assert_close(embeds[:at], text[:at], atol=0, rtol=0)
    torch.testing.assert_close(embeds[at + budget:], text[at + 1:], atol=0, rtol=0)
    assert positions.tolist() == list(range(embeds.shape[0]))
    assert model.last_visual_token_counts == [budget]
    assert model.last_visual_mask[0].nonzero().flatten().tolist() == list(range(at, at + budget))


def clip_reference_relevance(clip_path: str, features: torch.Tensor, query: str):
    """Image/query embeddings computed straight from transformers' CLIPModel (independent of our encoder)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(clip_path).eval()
    tok = AutoTokenizer.from_pretrained(clip_path)
    ids = tok(query).input_ids
    length = clip.config.text_config.max_position_embeddings
    segments = []
    for start in range(0, len(ids), length):
        chunk = ids[start:start + length]
        pad = length - len(chunk)
        seg_ids = torch.tensor([chunk + [0] * pad])
        seg_mask = torch.tensor([[1] * len(chunk) + [0] * pad])
        out = clip.text_model(input_ids=seg_ids, attention_mask=seg_mask)
        segments.append(clip.text_projection(out.pooler_output))
    with torch.no_grad():
        image = clip.visual_projection(clip.vision_model.post_layernorm(features))
    return image, torch.cat(segments).detach()


@pytest.mark.parametrize("query_repeat", [1, 10])  # 10 repeats -> > 77 CLIP tokens -> several segments
def test_llava15_script_uses_clip_relevance_of_the_question(llava15, monkeypatch, query_repeat):
    tokenizer, model, processor, _ = llava15
    torch.manual_seed(1)
    tower = model.get_vision_tower()
    planted = torch.randn(1, tower.num_patches, tower.hidden_size)
    plant_features(monkeypatch, model, planted)
    question = " ".join(["Is the cat red?"] * query_repeat)
    ids = prompt_ids(tokenizer, question + "\nAnswer the question using a single word or phrase.")
    pixels = process_images([random_image(50, 50)], processor, model.config)
    budget = 6
    model.set_pruning(PruningConfig(method="script", visual_token_num=budget))
    try:
        with Capture(model) as cap, torch.no_grad():
            model(ids[None], images=pixels, texts=[question + "\nAnswer the question using a single word or phrase."])
    finally:
        model.set_pruning(None)
    image_embeds, query_embeds = clip_reference_relevance(tower.vision_tower_name, planted, question)
    assert (query_embeds.shape[0] > 1) == (query_repeat > 1)
    with torch.no_grad():
        projected = model.get_model().mm_projector(planted)
    idx = sp.select(projected, budget, "script", image_embeds=image_embeds, query_embeds=query_embeds, negate=True)[0]
    at = image_span(ids)
    embeds = cap.calls[0]["inputs_embeds"][0]
    torch.testing.assert_close(embeds[at:at + budget], projected[0, idx], atol=0, rtol=0)


def test_query_falls_back_to_prompt_text_without_texts(llava15, monkeypatch):
    """Without texts=, the question after <image> (role tag and short-answer line removed) is used."""
    tokenizer, model, processor, _ = llava15
    torch.manual_seed(2)
    tower = model.get_vision_tower()
    planted = torch.randn(1, tower.num_patches, tower.hidden_size)
    plant_features(monkeypatch, model, planted)
    question = "what colour is the bus"
    ids = prompt_ids(tokenizer, question + "\nAnswer the question using a single word or phrase.")
    pixels = process_images([random_image(50, 50)], processor, model.config)
    model.set_pruning(PruningConfig(method="qcrs", visual_token_num=3))
    seen = []
    encoder = model._relevance_encoder()
    original = encoder.embed_query
    monkeypatch.setattr(encoder, "embed_query", lambda text: seen.append(text) or original(text))
    try:
        with torch.no_grad():
            model(ids[None], images=pixels)
    finally:
        model.set_pruning(None)
    assert seen == [question]


def test_budget_at_or_above_row_length_is_exactly_unpruned(llava15):
    tokenizer, model, processor, _ = llava15
    ids = prompt_ids(tokenizer, "Describe.")[None]
    pixels = process_images([random_image(70, 30)], processor, model.config)
    with torch.no_grad():
        model.set_pruning(None)
        base = model(ids, images=pixels).logits
        for budget in (16, 17, 576):
            model.set_pruning(PruningConfig(method="script", visual_token_num=budget))
            assert torch.equal(model(ids, images=pixels, texts=["Describe."]).logits, base)
            assert model.last_visual_token_counts == [16]
    model.set_pruning(None)


def test_merging_method_projects_kept_plus_merged_preprojector_tokens(llava15, monkeypatch):
    tokenizer, model, processor, _ = llava15
    torch.manual_seed(3)
    tower = model.get_vision_tower()
    planted = torch.randn(1, tower.num_patches, tower.hidden_size)
    plant_features(monkeypatch, model, planted)
    ids = prompt_ids(tokenizer, "Where is the dog?")
    pixels = process_images([random_image(50, 50)], processor, model.config)
    model.set_pruning(PruningConfig(method="trim", visual_token_num=4))
    try:
        with Capture(model) as cap, torch.no_grad():
            model(ids[None], images=pixels, texts=["Where is the dog?"])
    finally:
        model.set_pruning(None)
    image_embeds, query_embeds = clip_reference_relevance(tower.vision_tower_name, planted, "Where is the dog?")
    # PruningConfig.negate_relevance (default True) reaches every method with a `negate` parameter
    red = sp.reduce(planted, 4, "trim", image_embeds=image_embeds, query_embeds=query_embeds, negate=True)
    kept = torch.cat([planted[0, red.indices[0]], red.merged[0]], dim=0)
    with torch.no_grad():
        expected = model.get_model().mm_projector(kept)
    at = image_span(ids)
    count = model.last_visual_token_counts[0]
    assert count == expected.shape[0]
    torch.testing.assert_close(cap.calls[0]["inputs_embeds"][0, at:at + count], expected, atol=1e-6, rtol=0)


def test_visionzip_attention_inputs_match_eager_clip_attention(llava15):
    """The [CLS] attention we compute from hooked q/k equals CLIP's own eager attention probabilities."""
    from transformers import CLIPVisionModel

    _, model, processor, _ = llava15
    tower = model.get_vision_tower()
    pixels = process_images([random_image(64, 48)], processor, model.config)
    with torch.no_grad():
        ours = tower(pixels, with_attention=True)
        eager = CLIPVisionModel(tower.config).eval()
        eager.load_state_dict(tower.vision_tower.vision_model.state_dict())
        eager.config._attn_implementation = "eager"
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
    layer = tower.config.num_hidden_layers + tower.select_layer  # hidden_states[-2] is the output of layer L-2
    attn = out.attentions[layer]  # (1, heads, 17, 17)
    torch.testing.assert_close(ours.cls_attention, attn[:, :, 0, 1:].mean(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.features, out.hidden_states[tower.select_layer][:, 1:], atol=1e-6, rtol=0)


def test_visionzip_runs_end_to_end(llava15):
    tokenizer, model, processor, _ = llava15
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([random_image(50, 50)], processor, model.config)
    model.set_pruning(PruningConfig(method="visionzip", visual_token_num=6))
    try:
        out = model.generate(ids, images=pixels, max_new_tokens=3, do_sample=False)
    finally:
        model.set_pruning(None)
    assert out.shape == (1, 3)
    assert model.last_visual_token_counts == [6]


@pytest.mark.parametrize("long_query", [False, True])  # True: the samples' queries have 1 vs. several segments
def test_pruned_generation_and_left_padded_batch(llava15, long_query):
    tokenizer, model, processor, _ = llava15
    images = [random_image(60, 40, seed=4), random_image(40, 60, seed=5)]
    questions = ["What is shown?", "Is there a red car next to the small house?" * (8 if long_query else 1)]
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    pixels = process_images(images, processor, model.config)
    model.set_pruning(PruningConfig(method="script", visual_token_num=4))
    try:
        singles = [model.generate(p[None], images=pixels[i:i + 1], texts=[questions[i]], max_new_tokens=4,
                                  do_sample=False, pad_token_id=0)[0] for i, p in enumerate(prompts)]
        width = max(p.numel() for p in prompts)
        batch = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            batch[i, width - p.numel():] = p
            mask[i, width - p.numel():] = 1
        both = model.generate(batch, attention_mask=mask, images=pixels, texts=questions, max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    finally:
        model.set_pruning(None)
    assert model.last_visual_token_counts == [4, 4]
    assert model.last_visual_mask.sum(dim=1).tolist() == [4, 4]
    for i in range(2):
        assert both[i].tolist() == singles[i].tolist()


# ------------------------------------------------------------------------------------------ LLaVA-NeXT
def reference_next_layout(kept: list[set], tiles_x: int, tiles_y: int, side: int, size: tuple):
    """Slow reference of the pruned spatial_unpad layout: list of ("tok", tile, index) / ("nl",) entries."""
    width, height = size
    grid_h, grid_w = tiles_y * side, tiles_x * side
    # LLaVA's unpad: keep the rows/cols that cover the image inside the letterboxed grid
    if width / height > grid_w / grid_h:
        new_h = int(height * grid_w / width)
        pad = (grid_h - new_h) // 2
        rows, cols = range(pad, grid_h - pad), range(grid_w)
    else:
        new_w = int(width * grid_h / height)
        pad = (grid_w - new_w) // 2
        rows, cols = range(grid_h), range(pad, grid_w - pad)
    entries = []
    for y in rows:
        line = []
        for x in cols:
            tile = (y // side) * tiles_x + (x // side)
            index = (y % side) * side + (x % side)
            if index in kept[tile]:
                line.append(("tok", tile, index))
        if line:
            entries += line + [("nl",)]
    return entries


@pytest.mark.parametrize("size", [(100, 40), (40, 100), (130, 125), (170, 50)])
def test_llava_next_pruned_layout(llava_next, monkeypatch, size):
    tokenizer, model, processor, _ = llava_next
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    image = random_image(*size)
    pixels = process_images([image], processor, model.config)  # (1, 1 + T, 3, S, S)
    views = pixels.shape[1]
    torch.manual_seed(sum(size))
    planted = torch.randn(views, tower.num_patches, tower.hidden_size)
    plant_features(monkeypatch, model, planted)
    ids = prompt_ids(tokenizer, "What is it?")
    budget = 5
    model.set_pruning(PruningConfig(method="divprune", visual_token_num=budget))
    try:
        with Capture(model) as cap, torch.no_grad():
            model(ids[None], images=pixels, image_sizes=[image.size])
    finally:
        model.set_pruning(None)
    with torch.no_grad():
        projected = model.get_model().mm_projector(planted)  # (V, 16, D)
    idx = sp.select(projected, budget, "divprune")  # (V, budget), one row per crop
    tiles_x, tiles_y = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
    assert tiles_x * tiles_y == views - 1
    entries = reference_next_layout([set(r.tolist()) for r in idx[1:]], tiles_x, tiles_y, side, image.size)
    newline = model.get_model().image_newline
    expected = [projected[0, i] for i in idx[0]]  # base crop: kept tokens in order, no newline
    expected += [newline if e[0] == "nl" else projected[1 + e[1], e[2]] for e in entries]
    expected = torch.stack(expected)
    at = image_span(ids)
    embeds = cap.calls[0]["inputs_embeds"][0]
    assert model.last_visual_token_counts == [expected.shape[0]]
    torch.testing.assert_close(embeds[at:at + expected.shape[0]], expected, atol=0, rtol=0)
    assert cap.calls[0]["position_ids"][0].tolist() == list(range(embeds.shape[0]))


def test_llava_next_full_budget_is_exactly_unpruned(llava_next):
    tokenizer, model, processor, _ = llava_next
    image = random_image(90, 45)
    ids = prompt_ids(tokenizer, "Describe.")[None]
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        model.set_pruning(None)
        base = model(ids, images=pixels, image_sizes=[image.size]).logits
        full = model.last_visual_token_counts
        model.set_pruning(PruningConfig(method="script", visual_token_num=16))
        assert torch.equal(model(ids, images=pixels, image_sizes=[image.size], texts=["Describe."]).logits, base)
        assert model.last_visual_token_counts == full
    model.set_pruning(None)


def test_llava_next_pruned_generation_end_to_end(llava_next):
    tokenizer, model, processor, _ = llava_next
    images = [random_image(100, 40, seed=1), random_image(130, 125, seed=2)]  # 2 and 4 tiles -> a list of views
    questions = ["What is it?", "How many?"]
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    width = max(p.numel() for p in prompts)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    pixels = process_images(images, processor, model.config)
    assert isinstance(pixels, list) and [p.shape[0] for p in pixels] == [3, 5]
    model.set_pruning(PruningConfig(method="script", visual_token_num=3))
    try:
        out = model.generate(batch, attention_mask=mask, images=pixels, image_sizes=[im.size for im in images],
                             texts=questions, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        model.set_pruning(None)
    assert out.shape == (2, 3)
    counts = model.last_visual_token_counts
    # base 3 + 3 per tile + at most one newline per unpadded grid row (4 rows per tile row)
    assert 3 + 3 * 2 <= counts[0] <= 3 + 3 * 2 + 4, counts
    assert 3 + 3 * 4 <= counts[1] <= 3 + 3 * 4 + 8, counts


def test_labels_are_expanded_with_ignore_index_over_visual_tokens(llava15):
    """Training path: the loss equals cross-entropy over the spliced sequence with image positions ignored."""
    tokenizer, model, processor, _ = llava15
    ids = prompt_ids(tokenizer, "Name it.")[None]
    labels = ids.clone()
    labels[labels < 0] = -100
    pixels = process_images([random_image(50, 50)], processor, model.config)
    with torch.no_grad():
        out = model(ids, images=pixels, labels=labels)
    n = model.last_visual_token_counts[0]
    at = image_span(ids[0])
    expanded = torch.cat([labels[0, :at], torch.full((n,), -100), labels[0, at + 1:]])
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], expanded[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_bfloat16_model_prunes_and_generates(tiny_llava15_path):
    """Half-precision weights: pruning still runs (script_prune does its math in float32) and generates."""
    tokenizer, model, processor, _ = load_pretrained_model(tiny_llava15_path, torch_dtype="bfloat16")
    assert model.get_vision_tower().dtype == torch.bfloat16
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([random_image(50, 70)], processor, model.config)
    model.set_pruning(PruningConfig(method="script", visual_token_num=3))
    out = model.generate(ids, images=pixels, texts=["What is it?"], max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 2)
    assert model.last_visual_token_counts == [3]
