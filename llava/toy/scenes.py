"""Synthetic scenes for the toy LLaVA: small coloured shapes on varied, partly textured backgrounds.

Every scene is a deterministic function of ``(seed, split, index)``. A scene holds a few objects of
distinct (colour, shape) pairs; most scenes contain distractors that share the colour or the shape of
another object, so a question about one object needs that object's own tokens (colour/shape binding).

Question types (the ``category`` field of LLaVA's question files):
- ``random`` / ``popular`` / ``adversarial``: POPE-style existence yes/no. Half of each category's
  questions ask about a present object ("yes"); the negatives are an absent object drawn at random
  (``random``), among the most frequent objects of the generator (``popular``), or built from a colour
  and a shape that are both in the scene but on different objects (``adversarial``).
- ``color``: colour of the only object of a named shape.
- ``count``: number of objects of a shape (1-3).
- ``relation``: is object A to the left or to the right of object B.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from llava.constants import SHORT_ANSWER_PROMPT

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (40, 70, 215),
    "yellow": (240, 215, 30),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
}
# Generator frequencies: colours and shapes are drawn with these weights, so some objects are more
# frequent than others (POPE's "popular" negatives are the most frequent absent objects).
SHAPE_WEIGHTS: tuple[float, ...] = (0.30, 0.25, 0.20, 0.15, 0.10)
COLOR_WEIGHTS: tuple[float, ...] = (0.26, 0.22, 0.18, 0.14, 0.11, 0.09)
BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("gray", (120, 120, 120)),
    ("beige", (170, 155, 125)),
    ("slate", (70, 80, 95)),
    ("olive", (105, 110, 70)),
    ("brown", (110, 80, 60)),
    ("teal", (60, 105, 105)),
)
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "noise", "dots")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
EXISTENCE_CATEGORIES: tuple[str, ...] = ("random", "popular", "adversarial")
CATEGORIES: tuple[str, ...] = EXISTENCE_CATEGORIES + ("color", "count", "relation")


@dataclass(frozen=True)
class SceneConfig:
    """Image size and object layout of the generated scenes."""

    image_size: int = 168
    min_objects: int = 3
    max_objects: int = 6
    min_radius: int = 11
    max_radius: int = 14
    margin: int = 4                # free pixels between two objects' bounding circles
    distractor_prob: float = 0.6   # chance that a new object copies the colour or shape of an earlier one
    min_relation_gap: int = 24     # |x_a - x_b| needed to ask a left/right question


@dataclass(frozen=True)
class SceneObject:
    """One object: colour and shape names, centre (x, y) and radius in pixels."""

    color: str
    shape: str
    x: int
    y: int
    radius: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class QA:
    """One short-answer question about a scene."""

    question: str      # without LLaVA's short-answer line
    answer: str
    category: str


@dataclass
class Scene:
    """A generated scene: objects, background description and the rendered image."""

    image: Image.Image
    objects: list[SceneObject]
    background: str
    texture: str
    split: str
    index: int
    qas: list[QA] = field(default_factory=list)

    @property
    def image_id(self) -> str:
        return f"toy_{self.split}_{self.index:06d}"


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator for one scene, so scenes do not depend on how many were made before."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLITS[split], index])


def _weighted_choice(rng: np.random.Generator, names: tuple[str, ...], weights: tuple[float, ...]) -> str:
    p = np.asarray(weights, dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_objects(rng: np.random.Generator, cfg: SceneConfig) -> list[tuple[str, str]]:
    """(colour, shape) pairs, all distinct; many copy an earlier object's colour or shape (distractors)."""
    colors = tuple(COLORS)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        color = _weighted_choice(rng, colors, COLOR_WEIGHTS)
        shape = _weighted_choice(rng, SHAPES, SHAPE_WEIGHTS)
        if pairs and rng.random() < cfg.distractor_prob:
            ref_color, ref_shape = pairs[int(rng.integers(len(pairs)))]
            if rng.random() < 0.5:
                color = ref_color
            else:
                shape = ref_shape
        if (color, shape) in pairs:
            continue
        if sum(s == shape for _, s in pairs) >= 3:   # counts stay in 1..3
            continue
        pairs.append((color, shape))
    return pairs


def place_objects(rng: np.random.Generator, pairs: list[tuple[str, str]], cfg: SceneConfig) -> list[SceneObject]:
    """Non-overlapping positions by rejection sampling (restarts the layout if it gets stuck)."""
    for _ in range(100):
        objects: list[SceneObject] = []
        for color, shape in pairs:
            for _ in range(200):
                r = int(rng.integers(cfg.min_radius, cfg.max_radius + 1))
                x = int(rng.integers(r + 2, cfg.image_size - r - 2))
                y = int(rng.integers(r + 2, cfg.image_size - r - 2))
                if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (r + o.radius + cfg.margin) ** 2 for o in objects):
                    objects.append(SceneObject(color, shape, x, y, r))
                    break
            else:
                break
        if len(objects) == len(pairs):
            return objects
    raise RuntimeError("could not place the objects; image_size is too small for max_objects")


def _background(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, str, str]:
    """(H, W, 3) float background with a texture over part (or all) of the image."""
    s = cfg.image_size
    name, base = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base_rgb = np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0, 12, 3), 0, 255)
    img = np.broadcast_to(base_rgb, (s, s, 3)).copy()
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:s, 0:s]
    if texture == "stripes":
        period = int(rng.integers(6, 14))
        pattern = ((xx + yy * int(rng.integers(0, 2))) // (period // 2)) % 2
    elif texture == "checker":
        cell = int(rng.integers(8, 20))
        pattern = ((xx // cell) + (yy // cell)) % 2
    elif texture == "noise":
        pattern = rng.random((s, s))
    elif texture == "dots":
        pattern = ((xx % 9 < 2) & (yy % 9 < 2)).astype(np.float64)
    else:
        pattern = np.zeros((s, s))
    region = np.ones((s, s), dtype=bool)
    if texture != "plain" and rng.random() < 0.6:        # texture over a random rectangle only
        x0, y0 = rng.integers(0, s // 2, 2)
        x1, y1 = x0 + rng.integers(s // 3, s, 2)
        region = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    shade = rng.uniform(18, 35) * (1 if rng.random() < 0.5 else -1)
    img += (pattern * region)[..., None] * shade
    img += rng.normal(0, 4, (s, s, 3))                    # sensor-like noise everywhere
    return img, name, texture


def _shape_polygon(shape: str, x: int, y: int, r: int) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(x - b, y - a), (x + b, y - a), (x + b, y - b), (x + a, y - b), (x + a, y + b), (x + b, y + b),
                (x + b, y + a), (x - b, y + a), (x - b, y + b), (x - a, y + b), (x - a, y - b), (x - b, y - b)]
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(objects: list[SceneObject], background: np.ndarray) -> Image.Image:
    """Draw the objects over the background; returns an RGB PIL image."""
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius], fill=fill)
        else:
            draw.polygon(_shape_polygon(o.shape, o.x, o.y, o.radius), fill=fill)
    return image


def object_index_mask(objects: list[SceneObject], image_size: int) -> np.ndarray:
    """(H, W) uint8 map: ``k + 1`` where object ``k`` is drawn (later objects on top, as in :func:`render`), 0 elsewhere."""
    if len(objects) > 254:
        raise ValueError(f"objects must hold at most 254 objects, got {len(objects)}")
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    for k, o in enumerate(objects):
        if o.shape == "circle":
            draw.ellipse([o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius], fill=k + 1)
        else:
            draw.polygon(_shape_polygon(o.shape, o.x, o.y, o.radius), fill=k + 1)
    return np.asarray(mask)


def caption(scene: Scene) -> str:
    """Caption listing the objects from left to right and the background."""
    names = [f"a {o.name}" for o in sorted(scene.objects, key=lambda o: o.x)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    texture = "" if scene.texture == "plain" else f" {scene.texture}"
    return f"From left to right: {listed}, on a {scene.background}{texture} background."


def popularity_order() -> list[tuple[str, str]]:
    """All (colour, shape) pairs, most frequent first under the generator's weights."""
    pairs = [(c, s, cw * sw) for c, cw in zip(COLORS, COLOR_WEIGHTS) for s, sw in zip(SHAPES, SHAPE_WEIGHTS)]
    return [(c, s) for c, s, _ in sorted(pairs, key=lambda t: -t[2])]


def existence_question(color: str, shape: str) -> str:
    return f"Is there a {color} {shape} in the image?"


def negative_object(rng: np.random.Generator, objects: list[SceneObject], category: str) -> tuple[str, str]:
    """An absent (colour, shape) pair chosen by POPE's ``random`` / ``popular`` / ``adversarial`` rule."""
    present = {(o.color, o.shape) for o in objects}
    absent = [p for p in popularity_order() if p not in present]
    if category == "random":
        return absent[int(rng.integers(len(absent)))]
    if category == "popular":
        top = absent[:5]
        return top[int(rng.integers(len(top)))]
    if category == "adversarial":
        colors = {o.color for o in objects}
        shapes = {o.shape for o in objects}
        binding = [p for p in absent if p[0] in colors and p[1] in shapes]
        pool = binding or [p for p in absent if p[0] in colors or p[1] in shapes] or absent
        return pool[int(rng.integers(len(pool)))]
    raise ValueError(f"category must be one of {EXISTENCE_CATEGORIES}, got {category!r}")


def existence_qa(rng: np.random.Generator, objects: list[SceneObject], category: str, positive: bool) -> QA:
    if positive:
        o = objects[int(rng.integers(len(objects)))]
        return QA(existence_question(o.color, o.shape), "yes", category)
    color, shape = negative_object(rng, objects, category)
    return QA(existence_question(color, shape), "no", category)


def color_qa(rng: np.random.Generator, objects: list[SceneObject]) -> QA | None:
    """Colour of a shape that occurs exactly once (None if every shape repeats)."""
    single = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if not single:
        return None
    o = single[int(rng.integers(len(single)))]
    return QA(f"What color is the {o.shape}?", o.color, "color")


def count_qa(rng: np.random.Generator, objects: list[SceneObject]) -> QA:
    """Number of objects of a present shape, repeated shapes favoured so that counts 1-3 are balanced."""
    shapes = sorted({o.shape for o in objects})
    counts = np.array([sum(o.shape == s for o in objects) for s in shapes], dtype=np.float64)
    shape = shapes[int(rng.choice(len(shapes), p=counts**2 / (counts**2).sum()))]
    n = sum(o.shape == shape for o in objects)
    return QA(f"How many {PLURALS[shape]} are there in the image?", str(n), "count")


def relation_qa(rng: np.random.Generator, objects: list[SceneObject], cfg: SceneConfig) -> QA | None:
    """Left/right of two objects whose centres are at least ``min_relation_gap`` apart horizontally."""
    pairs = [(a, b) for a in objects for b in objects if a is not b and abs(a.x - b.x) >= cfg.min_relation_gap]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    answer = "left" if a.x < b.x else "right"
    return QA(f"Is the {a.name} to the left or to the right of the {b.name}?", answer, "relation")


def scene_questions(rng: np.random.Generator, objects: list[SceneObject], cfg: SceneConfig) -> list[QA]:
    """One question of each category (existence answers alternate at random between yes and no)."""
    qas = [existence_qa(rng, objects, c, positive=bool(rng.random() < 0.5)) for c in EXISTENCE_CATEGORIES]
    qas += [q for q in (color_qa(rng, objects), count_qa(rng, objects), relation_qa(rng, objects, cfg)) if q]
    return qas


def make_scene(seed: int, split: str, index: int, cfg: SceneConfig = SceneConfig()) -> Scene:
    """The scene ``index`` of ``split``: image, objects and one question per category."""
    rng = scene_rng(seed, split, index)
    objects = place_objects(rng, sample_objects(rng, cfg), cfg)
    background, bg_name, texture = _background(rng, cfg)
    scene = Scene(render(objects, background), objects, bg_name, texture, split, index)
    scene.qas = scene_questions(rng, objects, cfg)
    return scene


def with_short_answer_prompt(question: str) -> str:
    """The question as LLaVA's short-answer question files write it."""
    return f"{question}\n{SHORT_ANSWER_PROMPT}"
