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
    assert model.get_vision_tower().num_patches_per_side == 12


def test_asked_objects_and_attention_supervision_hand_computed():
    from llava.toy.scenes import SceneObject

    objs = [SceneObject("red", "square", 21, 21, 8), SceneObject("blue", "square", 100, 21, 8),
            SceneObject("white", "cross", 147, 119, 6)]
    red_sq, blue_sq, white_cross = 2, 1 + 2 * 5 + 1, 30
    assert T.asked_object_classes(QA("How many squares are there in the image?", "2", "count"), objs) == [red_sq, blue_sq]
    assert T.asked_object_classes(QA("What color is the cross?", "white", "color"), objs) == [white_cross]
    assert T.asked_object_classes(QA("Is there a blue square in the image?", "yes", "random"), objs) == [blue_sq]
    assert T.asked_object_classes(QA("Is there a red cross in the image?", "no", "adversarial"), objs) == []
    # 2 rows, 4 patches, image token at text position 1; the answer of row 0 is predicted at text position 3
    # (spliced: 3 + 4 - 1 = 6), row 1 has an absent-object question (no target)
    labels = torch.tensor([[0, red_sq, red_sq, blue_sq], [white_cross, 0, 0, 0]])
    target, rows = T.attention_targets([[3], [2]], [[[red_sq]], [[]]], labels, torch.tensor([1, 1]), 4, 8)
    assert rows.tolist() == [[False] * 6 + [True, False], [False] * 8]
    assert target[0, 6].tolist() == [0.0, 1.0, 1.0, 0.0]
    # attention of head 0 at (row 0, position 6): 0.2 and 0.3 on image columns 2 and 3 -> loss -log(0.5)
    att = torch.zeros(2, 2, 8, 8)
    att[0, 0, 6, 2], att[0, 0, 6, 3], att[0, 0, 6, 0] = 0.2, 0.3, 0.5
    loss = T.attention_supervision_loss([att], (0,), torch.tensor([1, 1]), target, rows)
    assert abs(float(loss) - float(-np.log(0.5 + 1e-6))) < 1e-6
