"""The toy LLaVA: training path == LLaVA model path, the committed checkpoint answers, and the demo runs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.toy import train as T  # noqa: E402
from llava.toy.scenes import QA, make_scene, with_short_answer_prompt  # noqa: E402

CKPT = str(T.__file__).rsplit("/", 1)[0] + "/checkpoint"
DEMO_QUESTIONS = __import__("pathlib").Path(CKPT).parent / "demo_scenes" / "questions.json"


@pytest.fixture(scope="module")
def loaded():
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(CKPT, device="cpu")


def _naive_splice(embed, projector, ids, labels, feats):
    """Reference: per-row loop that cuts each row at its image token (LLaVA's prepare_inputs_labels logic)."""
    rows, labs = [], []
    for b in range(ids.shape[0]):
        valid = ids[b] != -1
        i, l = ids[b][valid], labels[b][valid]
        p = int((i == IMAGE_TOKEN_INDEX).nonzero()[0])
        rows.append(torch.cat([embed(i[:p]), projector(feats[b]), embed(i[p + 1:])]))
        labs.append(torch.cat([l[:p], torch.full((feats.shape[1],), IGNORE_INDEX), l[p + 1:]]))
    return rows, labs


def test_splice_matches_per_row_reference():
    torch.manual_seed(0)
    tok = T.train_llama_tokenizer(["a red circle", "is there a blue square"] * 5, vocab_size=300)
    model = T.ToyLlava(T.LlmSizes(hidden=16, intermediate=32, layers=1, heads=2), len(tok), 8, tok)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, IMAGE_TOKEN_INDEX, 4, -1, -1, -1]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9],
                           [IGNORE_INDEX, IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    feats = torch.randn(2, 3, 8)
    embeds, new_labels, mask = model.splice(ids, labels, feats)
    ref_rows, ref_labels = _naive_splice(model.llm.get_input_embeddings(), model.mm_projector, ids, labels, feats)
    for b in range(2):
        n = len(ref_rows[b])
        torch.testing.assert_close(embeds[b, :n], ref_rows[b])
        assert torch.equal(new_labels[b, :n], ref_labels[b])
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert (new_labels[b, n:] == IGNORE_INDEX).all()


def test_conversation_encoding_masks_all_but_answers(loaded):
    tokenizer = loaded[0]
    enc = T.ConversationEncoder(tokenizer)
    qas = [QA("What color is the square?", "purple", "color"), QA("How many circles are there in the image?", "2", "count")]
    ids, labels = enc.encode(qas)
    first = T.eval_prompt(with_short_answer_prompt(qas[0].question))
    from llava.mm_utils import tokenizer_image_token

    prefix = tokenizer_image_token(first, tokenizer)
    assert ids[: len(prefix)] == prefix                      # first turn == the evaluation prompt
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=True).split() == ["purple", "2"]
    assert trained.count(tokenizer.eos_token_id) == 2        # every answer ends with </s>, as in preprocess_v1


def test_training_path_equals_llava_model_forward(loaded):
    """Logits of the train-time splice (cached CLIP features) == LlavaLlamaForCausalLM(input_ids, images)."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from llava.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, processor, _ = loaded
    cfg = json.load(open(f"{CKPT}/toy_training.json"))["config"]
    scene = make_scene(0, "test", 1)
    qa = scene.qas[3]
    q = with_short_answer_prompt(qa.question)
    ids = tokenizer_image_token(T.eval_prompt(q), tokenizer, return_tensors="pt")[None]
    pixels = process_images([scene.image], processor, model.config)
    toy = T.ToyLlava(T.LlmSizes(**cfg["llm"]), model.config.vocab_size, cfg["clip"]["vision_hidden"], tokenizer)
    state = load_file(f"{CKPT}/model.safetensors")
    toy.llm.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k})
    toy.mm_projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in state.items() if "mm_projector" in k})
    clip = CLIPModel.from_pretrained(f"{CKPT}/clip").eval()
    with torch.no_grad():
        ref = model(ids, images=pixels, image_sizes=[scene.image.size]).logits
        feats = T.vision_features(clip.vision_model, pixels)
        rows = T.collate([T.ConversationEncoder(tokenizer).encode([qa])])
        embeds, _, mask = toy.splice(*rows, feats)
        ours = toy.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, : ref.shape[1]]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_checkpoint_is_small_and_in_llava_format():
    files = [os.path.join(d, f) for d, _, fs in os.walk(CKPT) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 20 * 2**20
    cfg = json.load(open(f"{CKPT}/config.json"))
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_tower"] == "clip"
    clip = json.load(open(f"{CKPT}/clip/config.json"))["vision_config"]
    assert (clip["image_size"] // clip["patch_size"]) ** 2 >= 144


def test_demo_answers_bundled_scenes_and_draws(tmp_path, capsys):
    from PIL import Image

    from llava.demo import bundled_items, main

    summaries = main(["--budgets", "16", "--out", str(tmp_path), "--device", "cpu",
                      "--json", str(tmp_path / "demo.json")])
    items = bundled_items()
    assert len(summaries) == len(items) >= 3
    printed = capsys.readouterr().out
    assert "visual tokens  144" in printed and "visual tokens   16" in printed
    from llava.toy.scenes import COLORS

    vocab = {"adversarial": {"yes", "no"}, "color": set(COLORS), "relation": {"left", "right"}}
    categories = [r["category"] for r in json.loads((DEMO_QUESTIONS).read_text())]
    for s, item, cat in zip(summaries, items, categories):
        settings = {a["setting"]: a for a in s["answers"]}
        assert settings["unpruned"]["visual_tokens"] == 144 and settings["script@16"]["visual_tokens"] == 16
        # the trained model answers in the vocabulary of the question type (one word, then </s>)
        for a in s["answers"]:
            assert a["answer"].strip(". ").lower() in vocab[cat], (item.question, a)
        img = np.asarray(Image.open(s["picture"]).convert("RGB"))
        assert img.shape[0] > 100 and img.shape[1] > 300          # image panel + one kept-token panel
    assert json.loads((tmp_path / "demo.json").read_text())[0]["answers"][0]["setting"] == "unpruned"


def test_demo_bad_arguments():
    from llava.demo import main, parse_budgets

    with pytest.raises(ValueError, match="--image and --question"):
        main(["--image", "x.png"])
    with pytest.raises(ValueError, match="--budgets"):
        parse_budgets("0,16")
    with pytest.raises(ValueError, match="--method"):
        main(["--method", "nope"])


def test_quick_training_writes_a_loadable_checkpoint(tmp_path):
    from llava.model.builder import load_pretrained_model

    metrics = T.train(tmp_path / "ck", T.quick_config(), log=lambda m: None)
    assert set(metrics["val_first_token_accuracy"]) <= {"random", "popular", "adversarial", "color", "count", "relation"}
    tok, model, proc, _ = load_pretrained_model(str(tmp_path / "ck"), device="cpu")
    assert model.num_patches_per_side == 12


def test_question_objects_and_asked_objects_hand_computed():
    from llava.toy.scenes import SceneObject

    objs = [SceneObject("red", "square", 21, 21, 8), SceneObject("blue", "square", 100, 21, 8),
            SceneObject("white", "cross", 147, 119, 6)]
    red_sq, blue_sq, white_cross = 2, 1 + 2 * 5 + 1, 30
    count = QA("How many squares are there in the image?", "2", "count")
    assert T.question_objects(count) == (["squares"], ["squares"])
    assert T.asked_objects(count, objs) == ([red_sq, blue_sq], [red_sq, blue_sq])
    color = QA("What color is the cross?", "white", "color")
    assert T.question_objects(color) == (["cross"], ["cross"])
    assert T.asked_objects(color, objs) == ([white_cross], [white_cross])
    assert T.asked_objects(QA("Is there a blue square in the image?", "yes", "random"), objs) == ([blue_sq], [blue_sq])
    absent = QA("Is there a red cross in the image?", "no", "adversarial")
    assert T.question_objects(absent) == (["red", "cross"], ["red", "cross"])
    assert T.asked_objects(absent, objs) == ([], [])
    rel = QA("Is the white cross to the left or to the right of the red square?", "right", "relation")
    assert T.question_objects(rel) == (["white", "cross"], ["red", "square"])
    assert T.asked_objects(rel, objs) == ([white_cross], [red_sq])
    assert T.question_objects(QA(T.CAPTION_PROMPT, "From left to right: ...", "caption")) == ([], [])


def test_find_words_in_order_and_with_the_question_mark_merged():
    # ids: 9 = "red", 7 = "square", 8 = "square?" (merged), 5 = other
    word_ids = {"red": [[9], [90]], "square": [[7], [8]]}.__getitem__
    ids = [5, 7, 9, 5, 8, 9, 7]
    assert T.find_words(ids, 0, ["red", "square"], word_ids) == [[2], [4]]      # the square after the red
    assert T.find_words(ids, 3, ["red", "square"], word_ids) == [[5], [6]]
    with pytest.raises(ValueError, match="'red' not found"):
        T.find_words(ids, 6, ["red"], word_ids)


def test_attention_targets_and_losses_hand_computed():
    from llava.toy.scenes import SceneObject

    objs = [SceneObject("red", "square", 21, 21, 8), SceneObject("blue", "square", 100, 21, 8)]
    red_sq, blue_sq = 2, 1 + 2 * 5 + 1
    word_ids = {"red": [[11], [21]], "blue": [[12], [22]], "square": [[13], [23]], "squares": [[14], [24]]}.__getitem__
    # one row: text ids [BOS, IMG, q..., answer]; 4 patches; image token at text position 1
    ids = [1, -200, 5, 11, 13, 5, 12, 23, 6, 30, 2]
    qa = QA("Is the red square to the left or to the right of the blue square?", "left", "relation")
    encoded = [(ids, None, [8], [2])]                        # answer predicted at text position 8
    labels = torch.tensor([[0, red_sq, red_sq, blue_sq]])
    targets = T.attention_targets(encoded, [[qa]], [objs], labels, torch.tensor([1]), word_ids)
    spliced = lambda t: t + 3                                 # text positions after the image move by P - 1
    assert targets == [
        T.AttentionTarget(0, 0, spliced(8), (spliced(3), spliced(4)), "words"),
        T.AttentionTarget(0, 0, spliced(8), (2, 3), "patches"),
        T.AttentionTarget(0, 1, spliced(8), (spliced(6), spliced(7)), "words"),
        T.AttentionTarget(0, 1, spliced(8), (4,), "patches"),
    ]
    # A and B of the same colour: B's colour word is the second "red", not A's
    same = QA("Is the red circle to the left or to the right of the red square?", "left", "relation")
    word_ids3 = {"red": [[11], [21]], "circle": [[16], [26]], "square": [[13], [23]]}.__getitem__
    objs3 = [SceneObject("red", "circle", 10, 10, 5), SceneObject("red", "square", 30, 10, 5)]
    got = T.attention_targets([([1, -200, 5, 11, 16, 5, 11, 23, 6, 30, 2], None, [8], [2])], [[same]], [objs3],
                              torch.tensor([[1, 0, 0, red_sq]]), torch.tensor([1]), word_ids3)
    assert [(t.head, t.keys) for t in got if t.kind == "words"] == [(0, (6, 7)), (1, (9, 10))]
    # an existence question about an absent object: its patch target is the first token (<s>, "not found")
    absent = QA("Is there a blue cross in the image?", "no", "adversarial")
    word_ids2 = {"blue": [[12], [22]], "cross": [[15], [25]]}.__getitem__
    got = T.attention_targets([([1, -200, 5, 12, 25, 6, 30, 2], None, [5], [2])], [[absent]], [objs], labels,
                              torch.tensor([1]), word_ids2)
    assert [(t.head, t.keys, t.kind) for t in got] == [(0, (6, 7), "words"), (0, (0,), "patches"),
                                                        (1, (6, 7), "words"), (1, (0,), "patches")]
    # attention of 2 layers, 2 heads over 14 positions; layer 0 is the "words" layer, layer 1 the "patches" one
    att = torch.zeros(2, 1, 2, 14, 14)
    att[0, 0, 0, 11, 6], att[0, 0, 0, 11, 7] = 0.3, 0.2            # head 0 on A's words: 0.5
    att[0, 0, 1, 11, 9], att[0, 0, 1, 11, 10] = 0.1, 0.1           # head 1 on B's words: 0.2
    att[1, 0, 0, 11, 2], att[1, 0, 0, 11, 3] = 0.4, 0.4            # head 0 on A's patches: 0.8
    att[1, 0, 1, 11, 4] = 0.25                                     # head 1 on B's patch: 0.25
    loss = T.attention_supervision_loss(list(att), targets, (0,), (1,))
    words_loss = -(np.log(0.5 + 1e-6) + np.log(0.2 + 1e-6)) / 2
    patches_loss = -(np.log(0.8 + 1e-6) + np.log(0.25 + 1e-6)) / 2
    expected = 0.5 * (words_loss + patches_loss)
    assert abs(float(loss) - expected) < 1e-6
    # the read-out probe: soft class histogram and mean column of the attended patches (grid 2 x 2 here)
    readout = T.ObjectReadout(hidden=3, grid=2)
    with torch.no_grad():
        readout.classes.weight.zero_(); readout.classes.bias.zero_()
        readout.column.weight.zero_(); readout.column.bias.fill_(0.5)
    heads = torch.zeros(1, 14, 3)
    got = float(readout.loss(heads, targets, labels, torch.tensor([1])).detach())
    # uniform class logits -> CE = log(31) for each target; columns: A's patches (1, 2) -> cols (1, 0) -> 0.5,
    # B's patch 3 -> col 1 -> 1.0; MSE = (0 + 0.25) / 2, weighted by 10
    assert abs(got - (np.log(T.N_OBJECT_CLASSES) + 10 * 0.125)) < 1e-5
    # a "not found" target has class 0 and no column term: prefer class 0 by 2 nats over the rest
    with torch.no_grad():
        readout.classes.bias[0] = 2.0                  # object A's class 0
    sink = [T.AttentionTarget(0, 0, 11, (0,), "patches")]
    expected = -(2.0 - np.log(np.exp(2.0) + T.N_OBJECT_CLASSES - 1))
    assert abs(float(readout.loss(heads, sink, labels, torch.tensor([1])).detach()) - expected) < 1e-5


def test_dense_stage_trains_the_vision_tower_and_projector():
    from llava.toy.scenes import caption

    cfg = T.quick_config()
    cfg.dense_steps, cfg.dense_lr, cfg.warmup = 15, 3e-3, 1
    scenes = [make_scene(0, "train", i) for i in range(16)]
    clip_tok = T.train_clip_tokenizer([caption(s) for s in scenes], cfg.clip.vocab_size)
    clip = T.build_clip(cfg.clip, clip_tok)
    projector = torch.nn.Sequential(torch.nn.Linear(cfg.clip.vision_hidden, cfg.llm.hidden), torch.nn.GELU(),
                                    torch.nn.Linear(cfg.llm.hidden, cfg.llm.hidden))
    pixels = T.pixel_values([s.image for s in scenes], T.build_image_processor(cfg.clip))
    vm = clip.vision_model
    # layer -2 features: what feeds them is trained, the last encoder layer (unused by LLaVA) is not
    trained = [*vm.embeddings.parameters(), *vm.pre_layrnorm.parameters(), *vm.encoder.layers[:-1].parameters(),
               *projector.parameters()]
    unused = [*vm.encoder.layers[-1].parameters(), *vm.post_layernorm.parameters()]
    before = [p.detach().clone() for p in trained + unused]
    losses = T.train_vision_dense(vm, projector, pixels, T.labels_of(scenes, cfg), cfg, log=lambda m: None)
    assert len(losses) == 15 and np.mean(losses[-3:]) < losses[0]
    assert all(not torch.equal(b, a) for b, a in zip(before, trained))
    assert all(torch.equal(b, a) for b, a in zip(before[len(trained):], unused))
    assert not clip.vision_model.training


def test_same_seed_same_checkpoint(tmp_path):
    """Two trainings with one seed write identical weights and tokenizers (the BPE trainer's id order is
    canonicalised; everything else is seeded)."""
    for run in ("a", "b"):
        T.train(tmp_path / run, T.quick_config(seed=3), log=lambda m: None)
    for name in ("model.safetensors", "clip/model.safetensors", "tokenizer.json", "clip/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_command_line_options_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(T, "train", lambda out, cfg, log, resume: seen.update(cfg=cfg, out=out, resume=resume))
    T.main(["--out", "X", "--llava-steps", "7", "--clip-steps", "3", "--dense-steps", "0", "--llava-lr", "0.5",
            "--llava-batch", "2", "--rounds", "4", "--train-scenes", "40", "--dense-weight", "0.1",
            "--attn-weight", "0.2", "--readout-weight", "0.3", "--init-std", "0.04", "--llm-layers", "5",
            "--tune-vision", "--threads", "3", "--align-steps", "9"])
    cfg = seen["cfg"]
    assert (cfg.llava_steps, cfg.clip_steps, cfg.dense_steps, cfg.llava_lr, cfg.llava_batch, cfg.rounds,
            cfg.train_scenes) == (7, 3, 0, 0.5, 2, 4, 40)
    assert (cfg.dense_weight, cfg.attn_weight, cfg.readout_weight) == (0.1, 0.2, 0.3)
    assert (cfg.llm.init_std, cfg.llm.layers, cfg.tune_vision, cfg.threads, cfg.align_steps) == (0.04, 5, True, 3, 9)
    T.main(["--out", "Y"])                                   # no options: the defaults stay
    assert seen["cfg"] == T.ToyTrainConfig()


@pytest.mark.parametrize("change, message", [({"threads": 0}, "threads must be >= 1, got 0"),
                                             ({"val_every": 0}, "val_every must be >= 1, got 0"),
                                             ({"train_scenes": 8}, r"train_scenes must be >= clip_batch \(32\), got 8")])
def test_bad_training_config_is_refused_before_any_work(tmp_path, change, message):
    cfg = T.quick_config()
    for name, value in change.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=message):
        T.train(tmp_path / "out", cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_query_patch_loss_hand_computed():
    text = torch.tensor([[1.0, 0.0]])                                  # (B=1, E=2)
    patches = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])   # cosines 1, 0, -1
    scale = torch.tensor(2.0)
    denom = np.exp(2.0) + np.exp(0.0) + np.exp(-2.0)
    one = torch.tensor([[True, False, False]])
    assert abs(float(T.query_patch_loss(text, patches, one, scale)) + np.log(np.exp(2.0) / denom)) < 1e-6
    two = torch.tensor([[False, True, True]])                          # mass of two patches
    expected = -np.log((np.exp(0.0) + np.exp(-2.0)) / denom)
    assert abs(float(T.query_patch_loss(text, patches, two, scale)) - expected) < 1e-6
    # negated: the least similar patch (cos -1) now gets the most mass
    last = torch.tensor([[False, False, True]])
    assert abs(float(T.query_patch_loss(text, patches, last, scale, negate=True)) + np.log(np.exp(2.0) / denom)) < 1e-6


def test_query_alignment_trains_only_the_text_side_and_draws_no_global_random_numbers():
    from llava.toy.scenes import caption

    cfg = T.quick_config()
    cfg.align_steps, cfg.align_batch, cfg.align_lr, cfg.warmup = 15, 16, 3e-3, 1
    scenes = [make_scene(0, "train", i) for i in range(16)]
    clip_tok = T.train_clip_tokenizer([caption(s) for s in scenes] + [q.question for s in scenes for q in s.qas],
                                      cfg.clip.vocab_size)
    clip = T.build_clip(cfg.clip, clip_tok)
    pixels = T.pixel_values([s.image for s in scenes], T.build_image_processor(cfg.clip))
    feats = T.vision_features(clip.vision_model, pixels)
    encoder = {k: v.clone() for k, v in clip.vision_model.state_dict().items() if not k.startswith("post_layernorm")}
    text_side = [p.detach().clone() for p in (*clip.text_model.parameters(), clip.text_projection.weight,
                                              clip.visual_projection.weight)]
    rng_state = torch.get_rng_state()
    losses = T.train_query_alignment(clip, clip_tok, feats, [s.objects for s in scenes], T.labels_of(scenes, cfg),
                                     cfg, log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), rng_state)                 # the LLaVA stage's init is unaffected
    after = clip.vision_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in encoder.items())       # LLaVA's visual tokens do not change
    torch.testing.assert_close(T.vision_features(clip.vision_model, pixels), feats, rtol=0, atol=0)
    moved = [not torch.equal(b, a) for b, a in zip(text_side, (*clip.text_model.parameters(),
                                                               clip.text_projection.weight,
                                                               clip.visual_projection.weight))]
    assert all(moved[-2:]) and any(moved[:-2])
    assert len(losses) == 15 and np.mean(losses[-3:]) < losses[0]


def test_committed_clip_points_questions_at_their_objects(loaded):
    """What the pruning methods read: LLaVA's (negated, default) query relevance of the committed checkpoint
    puts its top patch on the asked object(s), judged by the scene generator's object masks."""
    import script_prune
    from llava.model.pruning import PruningConfig

    _, model, processor, _ = loaded
    cfg = T.ToyTrainConfig()
    hits = []
    for i in range(12):
        scene = make_scene(0, "test", i)
        labels = T.labels_of([scene], cfg)[0]
        pixels = T.pixel_values([scene.image], processor)
        features = model.visual_rows(pixels).vision_features  # (1, N, C), the pruning layer's view
        for qa in scene.qas:
            classes = sorted({c for side in T.asked_objects(qa, scene.objects) for c in side})
            if not classes:
                continue
            embeds = model.clip_embeddings(features, qa.question)  # the clip_text source
            relevance = script_prune.query_relevance(embeds["image_embeds"], embeds["query_embeds"][None],
                                                     negate=PruningConfig.__dataclass_fields__["negate_relevance"].default)
            hits.append(bool(torch.isin(labels[relevance[0].argmax()], torch.tensor(classes))))
    assert len(hits) >= 30 and np.mean(hits) >= 0.8, (len(hits), np.mean(hits))
