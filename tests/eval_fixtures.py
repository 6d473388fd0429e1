"""Tiny synthetic copies of the 10 evaluation benchmarks in their official formats (2-4 questions each).

`make_eval_data(root)` writes the folder layout that EVAL.md documents under `root`
(the DATA_DIR of the eval scripts) and returns `root`.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

SHORT = "\nAnswer the question using a single word or phrase."


def _image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.paste((255 - color[0], 255 - color[1], 255 - color[2]), (5, 5, size[0] // 2, size[1] // 2))
    img.save(path)


def _png_b64(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (36, 28), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """One JSON object per line (parent folders made); returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_gqa(root: Path) -> None:
    d = root / "gqa"
    qs = [("20001", "n1.jpg", "Is the sky blue?", "yes"), ("20002", "n2.jpg", "What color is the car?", "red"),
          ("20003", "n1.jpg", "Is there a dog?", "no")]
    write_jsonl(d / "llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": im, "text": t + SHORT, "category": "default"} for q, im, t, _ in qs])
    for i, name in enumerate(sorted({im for _, im, _, _ in qs})):
        _image(d / "data" / "images" / name, (30 + 80 * i, 60, 90))
    _json(d / "data" / "testdev_balanced_questions.json",
          {q: {"question": t, "answer": a, "imageId": im[:-4], "isBalanced": True} for q, im, t, a in qs})


def _mmbench_tsv(path: Path, cn: bool) -> None:
    import pandas as pd

    rows = [
        {"index": 0, "question": "What shape is shown?" if not cn else "图中是什么形状？", "hint": "A simple figure.",
         "A": "circle", "B": "square", "C": "triangle", "D": "star", "answer": "B"},
        {"index": 1, "question": "Which color dominates?" if not cn else "哪种颜色占主导？", "hint": float("nan"),
         "A": "red", "B": "green", "C": float("nan"), "D": float("nan"), "answer": "A"},
        {"index": 2, "question": "How many objects?" if not cn else "有几个物体？", "hint": float("nan"),
         "A": "one", "B": "two", "C": "three", "D": float("nan"), "answer": "A"},
    ]
    for i, r in enumerate(rows):
        r.update({"category": "test", "image": _png_b64((50 * i, 100, 150)), "source": "synthetic",
                  "l2-category": "test", "comment": float("nan"), "split": "dev"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def make_mmbench(root: Path) -> None:
    _mmbench_tsv(root / "mmbench" / "mmbench_dev_20230712.tsv", cn=False)
    _mmbench_tsv(root / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", cn=True)


def make_mme(root: Path) -> None:
    d = root / "MME"
    gt = d / "MME_Benchmark_release_version"
    yn = " Please answer yes or no."
    # existence: flat layout (image + txt side by side); artwork: images/ + questions_answers_YN/
    _image(gt / "existence" / "000001.jpg", (200, 10, 10))
    (gt / "existence" / "000001.txt").write_text(f"Is there a red square in this image?{yn}\tYes\n"
                                                  f"Is there a cat in this image?{yn}\tNo\n")
    _image(gt / "artwork" / "images" / "10002.jpg", (10, 200, 10))
    (gt / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (gt / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        f"Is this artwork created by Monet?{yn}\tYes\nIs this artwork created by Dali?{yn}\tNo\n")
    rows = []
    for qid, image, cat, txt in [
        ("existence/000001.jpg", "existence/000001.jpg", "existence", gt / "existence" / "000001.txt"),
        ("artwork/10002.jpg", "artwork/images/10002.jpg", "artwork", gt / "artwork" / "questions_answers_YN" / "10002.txt"),
    ]:
        for line in txt.read_text().splitlines():
            rows.append({"question_id": qid, "image": image, "text": line.split("\t")[0], "category": cat})
    write_jsonl(d / "llava_mme.jsonl", rows)


def make_mmvet(root: Path) -> None:
    d = root / "mm-vet"
    write_jsonl(d / "llava-mm-vet.jsonl", [
        {"question_id": 0, "image": "v1_0.png", "text": "What is written on the sign?"},
        {"question_id": 1, "image": "v1_1.png", "text": "Describe the colors in this picture."},
    ])
    _image(d / "images" / "v1_0.png", (240, 240, 0))
    _image(d / "images" / "v1_1.png", (0, 0, 240))


def make_pope(root: Path) -> None:
    d = root / "pope"
    items = [(1, "adversarial", "dog", "yes"), (2, "adversarial", "cat", "no"), (3, "popular", "car", "no"),
             (4, "random", "bus", "yes")]
    qs = []
    for qid, cat, obj, label in items:
        img = f"COCO_val2014_{qid:012d}.jpg"
        _image(d / "val2014" / img, (20 * qid, 120, 200 - 20 * qid))
        qs.append({"question_id": qid, "image": img, "text": f"Is there a {obj} in the image?" + SHORT, "category": cat,
                   "label": label})
    write_jsonl(d / "llava_pope_test.jsonl", [{k: v for k, v in q.items() if k != "label"} for q in qs])
    for cat in ("adversarial", "popular", "random"):
        write_jsonl(d / "coco" / f"coco_pope_{cat}.json",
               [{"question_id": q["question_id"], "image": q["image"], "text": q["text"], "label": q["label"]}
                for q in qs if q["category"] == cat])


def make_sqa(root: Path) -> None:
    d = root / "scienceqa"
    items = [
        ("5", "image.png", "Context: The picture shows a magnet.\nWhich pole is marked?\nA. north\nB. south", ["north", "south"], 0),
        ("9", None, "Context: none\nWhich is a mammal?\nA. frog\nB. whale\nC. trout", ["frog", "whale", "trout"], 1),
        ("12", "image.png", "Context: A map.\nWhich ocean is highlighted?\nA. Pacific\nB. Atlantic", ["Pacific", "Atlantic"], 1),
    ]
    questions, problems = [], {}
    for pid, img, text, choices, answer in items:
        q = {"id": pid, "conversations": [
            {"from": "human", "value": ("<image>\n" if img else "") + text},
            {"from": "gpt", "value": f"The answer is {'ABC'[answer]}."}]}
        if img:
            q["image"] = f"{pid}/{img}"
            _image(d / "images" / "test" / pid / img, (int(pid) * 15, 40, 80))
        questions.append(q)
        problems[pid] = {"question": text, "choices": choices, "answer": answer, "image": img, "split": "test"}
    _json(d / "llava_test_CQM-A.json", questions)
    _json(d / "problems.json", problems)
    _json(d / "pid_splits.json", {"test": [p for p, *_ in items], "val": []})


def make_textvqa(root: Path) -> None:
    d = root / "textvqa"
    items = [
        ("0054c91397f2fe05", 34602, "what does the sign say?", "STOP", ["stop"] * 8 + ["halt"] * 2),
        ("0054c91397f2fe05", 34603, "what color is the sign?", "STOP", ["red"] * 10),   # same image, new question
        ("00685bc495504d61", 34604, "what number is shown?", "7", ["7"] * 3 + ["seven"] * 3 + ["8"] * 4),
    ]
    write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": img, "image": f"{img}.jpg", "text": f"{q}\nReference OCR token: {ocr}" + SHORT}
        for img, _, q, ocr, _ in items])
    for i, img in enumerate(sorted({it[0] for it in items})):
        _image(d / "train_images" / f"{img}.jpg", (200, 40 + 100 * i, 40))
    _json(d / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question_id": qid, "image_id": img, "question": q, "answers": ans} for img, qid, q, _, ans in items]})


def make_vizwiz(root: Path) -> None:
    d = root / "vizwiz"
    sfx = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    write_jsonl(d / "llava_test.jsonl", [
        {"question_id": f"VizWiz_test_0000000{i}.jpg", "image": f"VizWiz_test_0000000{i}.jpg", "text": t + sfx}
        for i, t in enumerate(["What is this?", "What color is this shirt?"])])
    for i in range(2):
        _image(d / "test" / f"VizWiz_test_0000000{i}.jpg", (90, 90 + 50 * i, 90))


def make_vqav2(root: Path) -> None:
    d = root / "vqav2"
    full = [(1001, "COCO_test2015_000000000001.jpg", "What is on the table?"),
            (1002, "COCO_test2015_000000000001.jpg", "How many cups are there?"),
            (1003, "COCO_test2015_000000000002.jpg", "Is it sunny?")]
    dev = full[:2]
    write_jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl",
           [{"question_id": q, "image": im, "text": t + SHORT, "category": "default"} for q, im, t in dev])
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl",
           [{"question_id": q, "image": im, "text": t + SHORT, "category": "default"} for q, im, t in full])
    for i, im in enumerate(sorted({im for _, im, _ in full})):
        _image(d / "test2015" / im, (120, 30 * i, 220))


BUILDERS = {
    "gqa": make_gqa, "mmbench": make_mmbench, "mme": make_mme, "mmvet": make_mmvet, "pope": make_pope,
    "sqa": make_sqa, "textvqa": make_textvqa, "vizwiz": make_vizwiz, "vqav2": make_vqav2,
}


def make_eval_data(root: str | Path) -> Path:
    """Write all benchmarks under `root` and return it."""
    root = Path(root)
    for build in BUILDERS.values():
        build(root)
    return root
