"""Toy scene generator and split writer: rendering, answers recomputed from the objects, LLaVA file formats."""
from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from llava.toy import scenes as S
from llava.toy.data import write_split

N = 60  # scenes checked per test (fast: ~5 ms each)


@pytest.fixture(scope="module")
def train_scenes():
    return [S.make_scene(0, "train", i) for i in range(N)]


def test_same_seed_same_scene_and_splits_differ():
    a, b = S.make_scene(3, "test", 5), S.make_scene(3, "test", 5)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.qas == b.qas
    c = S.make_scene(3, "val", 5)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_image_size_and_object_pixels_match_metadata(train_scenes):
    for scene in train_scenes:
        arr = np.asarray(scene.image)
        assert arr.shape == (168, 168, 3)
        for o in scene.objects:
            # the centre of every shape lies inside it and is painted in the object's exact colour
            assert tuple(arr[o.y, o.x]) == S.COLORS[o.color], (scene.image_id, o)


def test_objects_distinct_non_overlapping_and_counts_bounded(train_scenes):
    for scene in train_scenes:
        objs = scene.objects
        assert 3 <= len(objs) <= 6
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        for a, b in product(objs, objs):
            if a is not b:
                assert np.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius
        assert max(sum(o.shape == s for o in objs) for s in S.SHAPES) <= 3


def test_most_scenes_have_colour_or_shape_distractors(train_scenes):
    def has_distractor(objs):
        return any(a is not b and (a.color == b.color or a.shape == b.shape) for a in objs for b in objs)

    assert np.mean([has_distractor(s.objects) for s in train_scenes]) > 0.7


def _expected_answer(scene: S.Scene, qa: S.QA) -> str:
    """Answer recomputed from the object list by parsing the question text (independent of the generator)."""
    objs = scene.objects
    words = qa.question.rstrip("?").split()
    if qa.category in S.EXISTENCE_CATEGORIES:          # "Is there a <color> <shape> in the image?"
        color, shape = words[3], words[4]
        return "yes" if any(o.color == color and o.shape == shape for o in objs) else "no"
    if qa.category == "color":                          # "What color is the <shape>?"
        matches = [o for o in objs if o.shape == words[-1]]
        assert len(matches) == 1
        return matches[0].color
    if qa.category == "count":                          # "How many <plural> are there in the image?"
        shape = {v: k for k, v in S.PLURALS.items()}[words[2]]
        return str(sum(o.shape == shape for o in objs))
    # "Is the <c1> <s1> to the left or to the right of the <c2> <s2>?"
    a = next(o for o in objs if (o.color, o.shape) == (words[2], words[3]))
    b = next(o for o in objs if (o.color, o.shape) == (words[-2], words[-1]))
    assert abs(a.x - b.x) >= S.SceneConfig().min_relation_gap
    return "left" if a.x < b.x else "right"


def test_answers_agree_with_objects(train_scenes):
    seen = set()
    for scene in train_scenes:
        for qa in scene.qas:
            assert _expected_answer(scene, qa) == qa.answer, (scene.image_id, qa)
            seen.add(qa.category)
    assert seen == set(S.CATEGORIES)


def test_negative_kinds_follow_pope_rules(train_scenes):
    weights = {(c, s): cw * sw for (c, cw), (s, sw) in product(zip(S.COLORS, S.COLOR_WEIGHTS),
                                                               zip(S.SHAPES, S.SHAPE_WEIGHTS))}
    rng = np.random.default_rng(0)
    for scene in train_scenes:
        present = {(o.color, o.shape) for o in scene.objects}
        absent_by_weight = sorted((p for p in weights if p not in present), key=lambda p: -weights[p])
        pop = S.negative_object(rng, scene.objects, "popular")
        assert pop not in present and weights[pop] >= weights[absent_by_weight[4]]
        adv = S.negative_object(rng, scene.objects, "adversarial")
        colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
        assert adv not in present
        if any(c in colors and s in shapes for c, s in absent_by_weight):
            assert adv[0] in colors and adv[1] in shapes
        assert S.negative_object(rng, scene.objects, "random") not in present
    with pytest.raises(ValueError, match="category"):
        S.negative_object(rng, train_scenes[0].objects, "frequent")


def test_yes_no_and_answer_balance():
    scenes = [S.make_scene(1, "train", i) for i in range(150)]
    ex = [qa.answer for s in scenes for qa in s.qas if qa.category in S.EXISTENCE_CATEGORIES]
    assert 0.4 < np.mean([a == "yes" for a in ex]) < 0.6
    counts = [qa.answer for s in scenes for qa in s.qas if qa.category == "count"]
    assert {"1", "2", "3"} <= set(counts)
    rel = [qa.answer for s in scenes for qa in s.qas if qa.category == "relation"]
    assert 0.35 < np.mean([a == "left" for a in rel]) < 0.65


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        S.make_scene(0, "dev", 0)
    with pytest.raises(ValueError, match="index"):
        S.make_scene(0, "train", -1)
    with pytest.raises(ValueError, match="n_scenes"):
        write_split("/tmp/unused", "test", 0)


def test_written_split_is_in_llava_formats(tmp_path):
    from llava.eval.eval_pope import score_pope

    out = write_split(tmp_path, "test", 12, seed=0)
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [q["question_id"] for q in questions] == list(range(len(questions)))
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"}
        assert q["text"].endswith("\nAnswer the question using a single word or phrase.")
        assert (out / "images" / q["image"]).is_file()
    # every answer is derivable from the scene itself
    scene_by_image = {f"{s.image_id}.png": s for s in (S.make_scene(0, "test", i) for i in range(12))}
    for q, a in zip(questions, answers):
        qa = S.QA(q["text"].split("\n")[0], a["answer"], q["category"])
        assert _expected_answer(scene_by_image[q["image"]], qa) == a["answer"]
    # POPE label files: perfect answers score 100 with the POPE scorer, flipped answers 0
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text("".join(json.dumps({"question_id": a["question_id"], "text": a["answer"].capitalize()}) + "\n"
                               for a in answers))
    metrics = score_pope(str(out / "pope"), str(out / "questions.jsonl"), str(perfect))
    assert all(metrics[c]["accuracy"] == 100.0 for c in S.EXISTENCE_CATEGORIES)
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({"question_id": a["question_id"],
                                           "text": "No" if a["answer"] == "yes" else "Yes"}) + "\n" for a in answers))
    metrics = score_pope(str(out / "pope"), str(out / "questions.jsonl"), str(flipped))
    assert all(metrics[c]["accuracy"] == 0.0 for c in S.EXISTENCE_CATEGORIES)
    conv = json.loads((out / "conversations.json").read_text())
    assert conv[0]["conversations"][0]["value"].startswith("<image>\n")
    assert [t["from"] for t in conv[0]["conversations"][:2]] == ["human", "gpt"]


def test_object_index_mask_marks_exactly_the_painted_pixels(train_scenes):
    """Pixels of mask value k + 1 carry object k's exact colour in the rendered image; the centre is inside."""
    for scene in train_scenes[:20]:
        arr = np.asarray(scene.image)
        mask = S.object_index_mask(scene.objects, 168)
        for k, o in enumerate(scene.objects):
            assert mask[o.y, o.x] == k + 1
            painted = arr[mask == k + 1]
            assert len(painted) > 100 and (painted == np.asarray(S.COLORS[o.color])).all()


def test_patch_object_labels_hand_computed():
    from llava.toy.train import N_OBJECT_CLASSES, patch_object_labels

    # a red square (class 1 + 0 * 5 + 1 = 2) filling patch (row 1, col 1) = pixels 14..27, and a white cross
    # (class 1 + 5 * 5 + 4 = 30) centred in patch (row 8, col 10)
    objs = [S.SceneObject("red", "square", 21, 21, 8), S.SceneObject("white", "cross", 10 * 14 + 7, 8 * 14 + 7, 6)]
    labels = patch_object_labels(objs, 168, 14, min_cover=0.2)
    expected = np.zeros(144, dtype=np.int64)
    expected[1 * 12 + 1] = 2
    expected[8 * 12 + 10] = 30
    assert N_OBJECT_CLASSES == 31
    assert np.array_equal(labels, expected)
    with pytest.raises(ValueError, match="image_size"):
        patch_object_labels(objs, 170, 14, min_cover=0.2)
