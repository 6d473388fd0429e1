"""Table 1 (Sec. 3.2): the redundancy estimators against hand-computed values and float64 loops."""

import json
import math

import pytest
import torch

from script_prune import core
from script_prune import redundancy as R

# --------------------------------------------------------------------------- planted duplicates
# 4 x 4 grid (row-major), one-hot features: every pair has cosine 0 except three planted twins (cosine 1):
#   A = {0, 2}: both even, not 8-neighbours     -> only the full graph sees it
#   B = {5, 6}: odd/even and 8-neighbours       -> full, bipartite and local see it
#   C = {8, 15}: even/odd, far apart            -> full and bipartite see it
TWINS = {0: 2, 2: 0, 5: 6, 6: 5, 8: 15, 15: 8}
UNIQUE = [1, 3, 4, 7, 9, 10, 11, 12, 13, 14]
TAU, GAMMA = 0.5, 1.0
RATIO = 0.375  # K = 16 - floor(0.375 * 16) = 10 = the unique tokens


def planted_features() -> torch.Tensor:
    """(1, 16, 13): twins share one basis vector, the other 10 tokens get their own."""
    x = torch.zeros(1, 16, 13)
    slot = {0: 0, 2: 0, 5: 1, 6: 1, 8: 2, 15: 2}
    for j, tok in enumerate(UNIQUE):
        slot[tok] = 3 + j
    for tok, s in slot.items():
        x[0, tok, s] = 2.0  # a non-unit norm: the estimators must normalise
    return x


def test_planted_scores_by_hand():
    x = planted_features()
    seen = math.exp(GAMMA * (1.0 - TAU))  # one neighbour in G_tau at similarity 1: d = 1, mu = 1
    expect = {
        "full": {0, 2, 5, 6, 8, 15},
        "bipartite": {5, 6, 8, 15},
        "local": {5, 6},
    }
    for name, redundant in expect.items():
        scores = R.estimator_scores(name, x, (4, 4), TAU, GAMMA)[0]
        want = torch.tensor([seen if i in redundant else 0.0 for i in range(16)])  # fallback: mean cosine 0
        torch.testing.assert_close(scores, want, rtol=0, atol=1e-6)


def test_planted_iou_and_pair_shares_by_hand():
    result = R_study().study(planted_features(), (4, 4), prune_ratio=RATIO, tau=TAU, gamma=GAMMA, repeats=1,
                             warmup=0, progress=False)
    rows = result["rows"]
    assert result["k"] == 10
    # full keeps the 10 uniques; bipartite's zero-score set is uniques + {0, 2}: the 10 lowest (ties to the
    # lower index) are {0,1,2,3,4,7,9,10,11,12}: 8 shared of 12 -> 2/3; local's zero set adds 8 and 15 too:
    # {0,1,2,3,4,7,8,9,10,11}: 7 shared of 13.
    assert rows["full"]["iou_at_k"] == 1.0
    assert rows["bipartite"]["iou_at_k"] == pytest.approx(8 / 12, abs=1e-6)
    assert rows["local"]["iou_at_k"] == pytest.approx(7 / 13, abs=1e-6)
    # pairs on a 4 x 4 grid: full 16*15/2 = 120; bipartite 8*8 = 64; local 4*3 + 3*4 + 2*3*3 = 42; random 0
    assert [rows[n]["sim_pairs"] for n in ("full", "bipartite", "local", "random")] == [120, 64, 42, 0]
    assert rows["bipartite"]["sim_percent"] == pytest.approx(100 * 64 / 120)
    assert rows["local"]["sim_percent"] == pytest.approx(35.0)
    assert rows["random"]["sim_percent"] == 0.0
    assert rows["full"]["speedup"] == 1.0


def test_pair_shares_on_llava_grid():
    # 24 x 24 = 576 tokens: 165,600 pairs; bipartite 288 * 288 = 82,944 (~50 %, Table 1);
    # 8-connected: 24*23 + 23*24 + 2*23*23 = 2,162
    assert R.similarity_pairs("full", (24, 24)) == 165600
    assert R.similarity_pair_share("bipartite", (24, 24)) == pytest.approx(82944 / 165600)
    assert R.similarity_pairs("local", (24, 24)) == 2162
    # 3 x 3 (odd N): full 36; bipartite 5 even x 4 odd = 20; 8-connected 3*2 + 2*3 + 2*2*2 = 20
    assert [R.similarity_pairs(n, (3, 3)) for n in ("full", "bipartite", "local", "random")] == [36, 20, 20, 0]
    assert R.keep_count(576, 0.9) == 58 and R.keep_count(144, 0.9) == 15


def R_study():
    from llava.eval import redundancy_study

    return redundancy_study


# --------------------------------------------------------------------------- float64 references
def _cos64(x, i, j):
    a, b = x[i].double(), x[j].double()
    return float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def _eq9_64(sims, tau, gamma):
    """Eq. 9 from its definition over a list of edge similarities."""
    above = [s for s in sims if s >= tau]
    if above:
        return len(above) * math.exp(gamma * (sum(above) / len(above) - tau))
    return sum(sims) / len(sims) if sims else 0.0


def _grid_neighbours(i, h, w):
    r, c = divmod(i, w)
    return [(r + dy) * w + c + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if (dy or dx) and 0 <= r + dy < h and 0 <= c + dx < w]


def _clustered(b, h, w, d, seed):
    """Features with spatially smooth clusters so both branches of Eq. 9 occur."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 3, d, generator=g)
    labels = torch.randint(0, 3, (b, h * w), generator=g)
    x = torch.gather(centres, 1, labels.unsqueeze(-1).expand(b, h * w, d))
    return x + 0.8 * torch.randn(b, h * w, d, generator=g)


@pytest.mark.parametrize("tau", [0.4, 0.7])
def test_local_window_matches_float64_loop(tau):
    h, w, gamma = 3, 5, 1.7
    x = _clustered(2, h, w, 6, seed=1)
    got = R.local_window_scores(x, (h, w), tau, gamma)
    branches = set()
    for b in range(2):
        for i in range(h * w):
            sims = [_cos64(x[b], i, j) for j in _grid_neighbours(i, h, w)]
            branches.add(any(s >= tau for s in sims))
            assert float(got[b, i]) == pytest.approx(_eq9_64(sims, tau, gamma), abs=1e-5), (b, i)
    assert branches == {True, False}  # both the degree and the fallback branch were checked


def test_full_graph_matches_float64_loop():
    x = _clustered(2, 4, 4, 5, seed=2)
    got = R.full_graph_scores(x, 0.3, 1.0)
    for b in range(2):
        for i in range(16):
            sims = [_cos64(x[b], i, j) for j in range(16) if j != i]
            assert float(got[b, i]) == pytest.approx(_eq9_64(sims, 0.3, 1.0), abs=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_bipartite_equals_gsp(n):
    x = _clustered(2, 1, n, 5, seed=n)
    torch.testing.assert_close(R.bipartite_scores(x, 0.3, 1.5), core.redundancy_scores(x, 0.3, 1.5), atol=1e-5, rtol=0)
    for b in range(2):  # and the bipartite edge sets from the definition
        for i in range(n):
            sims = [_cos64(x[b], i, j) for j in range(i % 2 == 0, n, 2)]
            assert float(R.bipartite_scores(x, 0.3, 1.5)[b, i]) == pytest.approx(_eq9_64(sims, 0.3, 1.5), abs=1e-5)


def test_iou_and_errors():
    a = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[False, True, True, False]])
    assert float(R.iou(a, b)[0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="grid_hw"):
        R.local_window_scores(torch.randn(1, 6, 3), (2, 2))
    with pytest.raises(ValueError, match="estimator"):
        R.estimator_scores("nope", torch.randn(1, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="prune_ratio"):
        R.keep_count(10, 1.0)


# --------------------------------------------------------------------------- the CLI
def test_cli_on_saved_features(tmp_path, capsys):
    path = tmp_path / "planted.pt"
    torch.save({"tokens": planted_features()}, path)
    out = tmp_path / "t1.json"
    R_study().main(["--features", str(path), "--prune-ratio", str(RATIO), "--tau", str(TAU), "--repeats", "2",
                    "--warmup", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"]["bipartite"]["iou_at_k"] == pytest.approx(2 / 3, abs=1e-6)
    assert data["rows"]["local"]["sim_pairs"] == 42
    printed = capsys.readouterr().out
    for head in ("Method", "Sim. (%)", "Time (ms)", "IOU@K", "Acc.", "Speedup", "Exhaustive", "Bipartite", "Random"):
        assert head in printed


@pytest.mark.parametrize("argv, message", [
    (["--prune-ratio", "1.0"], "prune-ratio"),
    (["--estimators", "local,bipartite"], "include 'full'"),
    (["--answers", "bogus=x.jsonl"], "NAME=PATH"),
    (["--grid", "3x3"], "grid"),
    (["--repeats", "0"], "repeats"),
])
def test_cli_refuses_bad_arguments(tmp_path, capsys, argv, message):
    path = tmp_path / "f.pt"
    torch.save(planted_features(), path)
    with pytest.raises(SystemExit):
        R_study().main(["--features", str(path), "--out", str(tmp_path / "o.json"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_cli_on_a_checkpoint_scores_the_models_projected_tokens(tiny_llava15_path, tmp_path):
    """The reference tokens come from transformers' own ``get_image_features`` of the loaded model."""
    from PIL import Image

    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    image = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    out = tmp_path / "t1.json"
    data = R_study().main(["--model-path", tiny_llava15_path, "--images", str(image), "--repeats", "1",
                           "--warmup", "0", "--out", str(out)])
    _, model, processor, _ = load_pretrained_model(tiny_llava15_path)
    with torch.inference_mode():
        pixels = process_images([Image.open(image).convert("RGB")], processor, model.config)
        tokens = torch.stack(model.hf.get_image_features(pixel_values=pixels).pooler_output)  # (1, N, D)
    n = tokens.shape[1]
    assert data["images"] == 1 and data["tokens_per_row"] == n
    k = R.keep_count(n, 0.9)
    full = R.kept_set(R.full_graph_scores(tokens.float()), k)
    bip = R.kept_set(R.bipartite_scores(tokens.float()), k)
    assert data["rows"]["bipartite"]["iou_at_k"] == pytest.approx(float(R.iou(bip, full)[0]), abs=1e-6)
    assert json.loads(out.read_text())["rows"]["full"]["iou_at_k"] == 1.0


def test_cli_acc_column_from_pope_answers(tmp_path, capsys):
    """Acc. = mean over the three POPE categories of the accuracy, by LLaVA's POPE scorer."""
    pope = tmp_path / "pope"
    pope.mkdir()
    questions, answers = [], []
    # per category: 4 questions; the answers get 4/4 (adversarial), 3/4 (popular), 2/4 (random) right
    right = {"adversarial": 4, "popular": 3, "random": 2}
    qid = 0
    for cat in ("adversarial", "popular", "random"):
        labels = []
        for j in range(4):
            label = "yes" if j % 2 == 0 else "no"
            q = {"question_id": qid, "image": f"{cat}{j}.jpg", "text": f"Is there a thing {j}?", "category": cat}
            questions.append(q)
            labels.append({"image": q["image"], "text": q["text"], "label": label})
            wrong = {"yes": "no", "no": "yes"}[label]
            answers.append({"question_id": qid, "text": (label if j < right[cat] else wrong).capitalize()})
            qid += 1
        (pope / f"coco_pope_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in labels))
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    afile = tmp_path / "bipartite.jsonl"
    afile.write_text("".join(json.dumps(a) + "\n" for a in answers))
    feats = tmp_path / "f.pt"
    torch.save(planted_features(), feats)
    data = R_study().main(["--features", str(feats), "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "o.json"),
                           "--answers", f"bipartite={afile}", "--pope-dir", str(pope), "--question-file", str(qfile)])
    assert data["rows"]["bipartite"]["acc"] == pytest.approx((100 + 75 + 50) / 3)
    assert data["rows"]["full"]["acc"] is None
    assert "75.00" in capsys.readouterr().out
