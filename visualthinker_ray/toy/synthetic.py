"""Synthetic SAT- and CV-Bench-format data: scenes of coloured shapes rendered with PIL.

The files are written with HF `datasets` in exactly the published column layouts (those the reference run read), so the
loaders, the trainer and the evaluator run end to end without the hub. Every function here is pure
for the `random.Random` it is given; writers derive one generator per row from (seed, split, row),
so a row does not change when the number of rows does.

Every question is answerable from the image alone: referents are unique in the scene, positional
relations have a clear gap, size and distance comparisons a clear ratio. Gold option positions and
gold labels (left vs right, first- vs second-mentioned, ...) are drawn uniformly, so answering a
constant option or label scores at chance.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageDraw

from visualthinker_ray.data.cvbench import cvbench_prompt
from visualthinker_ray.errors import InputError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 220),
    "green": (30, 150, 50),
    "yellow": (230, 190, 0),
    "purple": (130, 50, 170),
    "orange": (240, 120, 0),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (245, 245, 240), (238, 242, 248), (250, 245, 235))

QUESTION_TYPES = ("color", "shape", "count", "left_right", "above_below", "size")  # drawn by default
# Drawn only when asked for (--question-types), so the default rows stay as they were: "depth" is a
# size pair asked the way SAT asks about depth ("closer to the camera"), the wording CV-Bench's Depth
# task tests.
OPTIONAL_QUESTION_TYPES = ("depth",)
SELECTABLE_QUESTION_TYPES = QUESTION_TYPES + OPTIONAL_QUESTION_TYPES
MOTION_TYPE = "movement"  # the two-image question type (SAT's train split has such rows)
CVBENCH_2D_TASKS = ("Count", "Relation")
CVBENCH_3D_TASKS = ("Depth", "Distance")
COUNT_OPTIONS = ("1", "2", "3", "4")

MIN_OBJECTS, MAX_OBJECTS = 2, 5
MIN_IMAGE_SIZE = 48  # below this five objects with distinct sizes no longer fit reliably
MIN_AREA_RATIO = 2.0  # "bigger" / "closer to the camera" needs no squinting
MIN_DISTANCE_RATIO = 1.5  # "closer to the Z" likewise
MULTI_IMAGE_EVERY = 20  # one train row in 20 (5%) is a two-image row, as in real SAT
_MAX_TRIES = 1000


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    x: int  # centre, pixels
    y: int
    r: int  # half the side of the object's bounding square

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)

    @property
    def area(self) -> float:
        if self.shape == "circle":
            return math.pi * self.r**2
        if self.shape == "square":
            return 4.0 * self.r**2
        return 2.0 * self.r**2  # triangle: base 2r, height 2r


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class SyntheticQuestion:
    question_type: str
    question: str  # the bare question, no options
    answers: tuple[str, ...]  # the options, in shown order
    correct_answer: str  # one of `answers`
    scenes: tuple[Scene, ...]  # one per image (two for a motion question)


# ---------------------------------------------------------------- geometry and rendering


def _gap(image_size: int) -> int:
    """The clear gap between boxes that makes left/right and above/below unambiguous."""
    return max(4, image_size // 16)


def _radius_range(image_size: int) -> range:
    lo = max(3, round(0.06 * image_size))
    hi = max(lo + MAX_OBJECTS, round(0.14 * image_size))
    return range(lo, hi + 1)


def _apart(a: SceneObject, b: SceneObject, margin: int = 2) -> bool:
    """Bounding boxes separated by at least `margin` px, so the shapes cannot touch."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0


def _place(
    rng: random.Random, image_size: int, kinds: list[tuple[str, str]]
) -> tuple[SceneObject, ...] | None:
    """Objects of the given (shape, colour) kinds with distinct sizes at non-overlapping spots."""
    radii = rng.sample(_radius_range(image_size), len(kinds))
    placed: list[SceneObject] = []
    for (shape, color), r in zip(kinds, radii, strict=True):
        for _ in range(200):
            x = rng.randint(r + 1, image_size - 2 - r)
            y = rng.randint(r + 1, image_size - 2 - r)
            cand = SceneObject(shape, color, x, y, r)
            if all(_apart(cand, o) for o in placed):
                placed.append(cand)
                break
        else:
            return None
    return tuple(placed)


def _scene(rng: random.Random, image_size: int, kinds: list[tuple[str, str]]) -> Scene:
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be at least {MIN_IMAGE_SIZE} px, got {image_size}")
    background = rng.choice(BACKGROUNDS)
    for _ in range(_MAX_TRIES):
        objects = _place(rng, image_size, kinds)
        if objects is not None:
            return Scene(image_size, background, objects)
    raise RuntimeError(f"could not place {len(kinds)} objects in a {image_size} px image")


def _distinct_kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct (shape, colour) pairs, so "the red circle" names exactly one object."""
    return rng.sample([(s, c) for s in SHAPES for c in COLOR_NAMES], n)


def random_scene(rng: random.Random, image_size: int = 112) -> Scene:
    """A scene of 2-5 objects with distinct (shape, colour) kinds and distinct sizes."""
    return _scene(rng, image_size, _distinct_kinds(rng, rng.randint(MIN_OBJECTS, MAX_OBJECTS)))


def render_scene(scene: Scene) -> PILImage.Image:
    img = PILImage.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color]
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(o.x, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def scene_png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render_scene(scene).save(buf, format="PNG")
    return buf.getvalue()


def _mirror(scene: Scene, axis: str) -> Scene:
    """Reflect object positions (not pixels) across the centre line; keeps sizes and spacing."""
    last = scene.image_size - 1
    if axis == "x":
        objs = tuple(replace(o, x=last - o.x) for o in scene.objects)
    else:
        objs = tuple(replace(o, y=last - o.y) for o in scene.objects)
    return replace(scene, objects=objs)


def _h_gap(a: SceneObject, b: SceneObject) -> int:
    """Signed horizontal gap: positive when a lies wholly left of b."""
    return b.box[0] - a.box[2]


def _v_gap(a: SceneObject, b: SceneObject) -> int:
    """Signed vertical gap: positive when a lies wholly above b (image y grows downwards)."""
    return b.box[1] - a.box[3]


def _dist(a: SceneObject, b: SceneObject) -> float:
    return math.hypot(a.x - b.x, a.y - b.y)


def _shuffled(rng: random.Random, options: list[str]) -> tuple[str, ...]:
    """Options in random order: the gold position is uniform over positions."""
    options = list(options)
    rng.shuffle(options)
    return tuple(options)


# ---------------------------------------------------------------- question builders


def _n_objects(rng: random.Random, at_least: int = MIN_OBJECTS) -> int:
    return rng.randint(max(MIN_OBJECTS, at_least), MAX_OBJECTS)


def _color_question(rng: random.Random, image_size: int) -> SyntheticQuestion:
    color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    # The asked shape appears once, so "the circle" is unique.
    others = [(s, c) for s in SHAPES if s != shape for c in COLOR_NAMES]
    kinds = [(shape, color)] + rng.sample(others, _n_objects(rng) - 1)
    scene = _scene(rng, image_size, kinds)
    # Distractors prefer colours present in the scene: the question needs the referent, not a guess.
    present = sorted({c for _, c in kinds} - {color})
    absent = [c for c in COLOR_NAMES if c != color and c not in present]
    rng.shuffle(present)
    rng.shuffle(absent)
    distractors = (present + absent)[:2]
    return SyntheticQuestion(
        "color", f"What color is the {shape}?", _shuffled(rng, [color, *distractors]), color, (scene,)
    )


def _shape_question(rng: random.Random, image_size: int) -> SyntheticQuestion:
    shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
    others = [(s, c) for s in SHAPES for c in COLOR_NAMES if c != color]  # the colour stays unique
    kinds = [(shape, color)] + rng.sample(others, _n_objects(rng) - 1)
    scene = _scene(rng, image_size, kinds)
    question = f"What shape is the {color} object?"
    return SyntheticQuestion("shape", question, _shuffled(rng, list(SHAPES)), shape, (scene,))


SAT_COUNT_TEMPLATES = {"color": "How many {} objects are there?", "shape": "How many {}s are there?"}
CVBENCH_COUNT_TEMPLATES = {"shape": "How many {}s are in the image?"}


def _count_question(
    rng: random.Random, image_size: int, templates: dict[str, str] = SAT_COUNT_TEMPLATES
) -> SyntheticQuestion:
    k = int(rng.choice(COUNT_OPTIONS))  # the gold count first: counts are uniform by construction
    attribute = rng.choice(sorted(templates))
    n = _n_objects(rng, at_least=k)
    if attribute == "color":
        value = rng.choice(COLOR_NAMES)
        rest = [c for c in COLOR_NAMES if c != value]
        kinds = [(rng.choice(SHAPES), value) for _ in range(k)]
        kinds += [(rng.choice(SHAPES), rng.choice(rest)) for _ in range(n - k)]
    else:
        value = rng.choice(SHAPES)
        rest = [s for s in SHAPES if s != value]
        kinds = [(value, rng.choice(COLOR_NAMES)) for _ in range(k)]
        kinds += [(rng.choice(rest), rng.choice(COLOR_NAMES)) for _ in range(n - k)]
    rng.shuffle(kinds)
    scene = _scene(rng, image_size, kinds)
    question = templates[attribute].format(value)
    return SyntheticQuestion("count", question, _shuffled(rng, list(COUNT_OPTIONS)), str(k), (scene,))


def _same_shape_first_two(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct kinds whose first two share a shape (colours differ), the rest drawn at random."""
    shape = rng.choice(SHAPES)
    first_two = [(shape, c) for c in rng.sample(COLOR_NAMES, 2)]
    rest = [k for k in [(s, c) for s in SHAPES for c in COLOR_NAMES] if k not in first_two]
    return first_two + rng.sample(rest, n - 2)


def _pair_scene(
    rng: random.Random,
    image_size: int,
    n_min: int,
    ok: Callable[[tuple[SceneObject, ...]], bool],
    kinds: Callable[[random.Random, int], list[tuple[str, str]]] = _distinct_kinds,
) -> Scene:
    """A scene of distinct kinds whose first objects satisfy `ok(objects)`; rejection sampling."""
    for _ in range(_MAX_TRIES):
        scene = _scene(rng, image_size, kinds(rng, _n_objects(rng, at_least=n_min)))
        if ok(scene.objects):
            return scene
    raise RuntimeError(f"no scene met the question's constraint in {_MAX_TRIES} tries ({image_size} px)")


RELATIONS = {"x": ("left", "right"), "y": ("above", "below")}
SAT_RELATION_TEMPLATES = {
    "x": "Is the {a} to the left or to the right of the {b}?",
    "y": "Is the {a} above or below the {b}?",
}
CVBENCH_RELATION_TEMPLATE = (
    "Considering the relative positions of the {a} and the {b} in the image provided, "
    "where is the {a} located with respect to the {b}?"
)


def _relation_question(
    rng: random.Random, image_size: int, axis: str, template: str | None = None
) -> SyntheticQuestion:
    """Is A left/right of (or above/below) B. Boxes are separated by a clear gap along the axis."""
    gold = rng.choice(RELATIONS[axis])  # the gold label first: left/right 50/50 by construction
    gap = _gap(image_size)
    signed = _h_gap if axis == "x" else _v_gap
    # Either box wholly on one side of the other, with the gap (overlapping spans do not count).
    scene = _pair_scene(rng, image_size, 2, lambda o: max(signed(o[0], o[1]), signed(o[1], o[0])) >= gap)
    a, b = scene.objects[:2]
    if (signed(a, b) > 0) != (gold == RELATIONS[axis][0]):
        scene = _mirror(scene, axis)  # mirroring flips the relation and keeps everything else
    template = template or SAT_RELATION_TEMPLATES[axis]
    question = template.format(a=a.name, b=b.name)
    qtype = "left_right" if axis == "x" else "above_below"
    return SyntheticQuestion(qtype, question, _shuffled(rng, list(RELATIONS[axis])), gold, (scene,))


SAT_SIZE_TEMPLATE = "Which is bigger, the {a} or the {b}?"
SAT_DEPTH_TEMPLATE = "Which is closer to the camera, the {a} or the {b}?"
# Depth in a flat render: the bigger object stands for the one closer to the camera.
CVBENCH_DEPTH_TEMPLATE = "Which object is closer to the camera taking this photo, the {a} or the {b}?"


def _size_question(
    rng: random.Random,
    image_size: int,
    template: str = SAT_SIZE_TEMPLATE,
    same_shape: bool = False,
    question_type: str = "size",
) -> SyntheticQuestion:
    """Which of two objects is bigger (or, the same pair, closer to the camera). same_shape: both of
    one shape, so that the shape names (a square covers more than a circle of the same radius)
    cannot predict the answer."""

    def clear(o):
        return max(o[0].area, o[1].area) >= MIN_AREA_RATIO * min(o[0].area, o[1].area)

    scene = _pair_scene(rng, image_size, 2, clear, _same_shape_first_two if same_shape else _distinct_kinds)
    small, big = sorted(scene.objects[:2], key=lambda o: o.area)
    # The gold is mentioned first or second with equal chance.
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    question = template.format(a=first.name, b=second.name)
    options = _shuffled(rng, [first.name, second.name])
    return SyntheticQuestion(question_type, question, options, big.name, (scene,))


CVBENCH_DISTANCE_TEMPLATE = "Which of these two objects (the {a} or the {b}) is closer to the {c}?"


def _distance_question(rng: random.Random, image_size: int) -> SyntheticQuestion:
    """Which of A and B is closer (centre to centre, in pixels) to C, with a clear ratio."""

    def clear(o):
        d1, d2 = _dist(o[0], o[2]), _dist(o[1], o[2])
        return max(d1, d2) >= MIN_DISTANCE_RATIO * min(d1, d2)

    scene = _pair_scene(rng, image_size, 3, clear)
    x, y, z = scene.objects[:3]
    near, far = (x, y) if _dist(x, z) < _dist(y, z) else (y, x)
    first, second = (near, far) if rng.random() < 0.5 else (far, near)
    question = CVBENCH_DISTANCE_TEMPLATE.format(a=first.name, b=second.name, c=z.name)
    options = _shuffled(rng, [first.name, second.name])
    return SyntheticQuestion("Distance", question, options, near.name, (scene,))


def make_one_object_color_question(rng: random.Random, image_size: int = 112) -> SyntheticQuestion:
    """The simplest perception readout: one object, "What color is the object?", three colours.

    Not part of the SAT or CV-Bench sets: benchmarks use it to ask whether a model can see at all.
    """
    color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    scene = _scene(rng, image_size, [(shape, color)])
    options = [color, *rng.sample([c for c in COLOR_NAMES if c != color], 2)]
    return SyntheticQuestion("color", "What color is the object?", _shuffled(rng, options), color, (scene,))


def make_motion_question(rng: random.Random, image_size: int = 112) -> SyntheticQuestion:
    """A two-image question: one object moves left or right between the frames, the rest stay."""
    gold = rng.choice(("left", "right"))
    sign = -1 if gold == "left" else 1
    for _ in range(_MAX_TRIES):
        scene = random_scene(rng, image_size)
        mover, rest = scene.objects[0], scene.objects[1:]
        # A clear move: at least the object's width plus the gap, so its two positions do not overlap.
        least = 2 * mover.r + _gap(image_size)
        shift = rng.randint(least, max(least, image_size // 2))
        moved = replace(mover, x=mover.x + sign * shift)
        inside = moved.r + 1 <= moved.x <= image_size - 2 - moved.r
        if inside and all(_apart(moved, o) for o in rest):
            after = replace(scene, objects=(moved, *rest))
            question = f"Did the {mover.name} move to the left or to the right between the two images?"
            return SyntheticQuestion(
                MOTION_TYPE, question, _shuffled(rng, ["left", "right"]), gold, (scene, after)
            )
    raise RuntimeError(f"could not make a motion question in a {image_size} px image")


# ---------------------------------------------------------------- grounding (the warm-up's "base can see")

GROUNDING_GRID = 8  # positions are given in eighths of the image: 0 (left/top) .. 7 (right/bottom)


def _cell(v: int, image_size: int) -> int:
    return min(GROUNDING_GRID - 1, v * GROUNDING_GRID // image_size)


def _size_word(o: SceneObject) -> int:
    """Side of a square of the object's area, in units of 4 px (so a 2x area ratio shows)."""
    return round(math.sqrt(o.area) / 4)


def grounding_text(q: SyntheticQuestion) -> str:
    """Where the objects a one-image question is about are: the warm-up's stand-in for a base model
    that can ground what it is asked about (Qwen2-VL is pretrained on grounding with boxes).

    Objects named in full ("the red circle") get "The red circle is at X Y size S." in the order the
    question names them; a count question lists every object it counts ("I see red circle at X Y,
    ..."); a colour or shape question places the object it names ("The circle is at X Y.") without
    saying what is asked. X, Y are cells of a GROUNDING_GRID x GROUNDING_GRID grid, S the side of a
    square of the object's area in 4 px. It states facts of the image, never which option is right:
    mapping these facts to the answer is what RL has to learn.
    """
    if len(q.scenes) != 1:
        raise ValueError(f"grounding_text needs a one-image question, got {len(q.scenes)} images")
    scene = q.scenes[0]

    def at(o: SceneObject) -> str:
        return f"{_cell(o.x, scene.image_size)} {_cell(o.y, scene.image_size)}"

    if q.question_type.lower() == "count":
        counted = [
            o for o in scene.objects if f"{o.color} objects" in q.question or f"{o.shape}s" in q.question
        ]
        counted.sort(key=lambda o: (o.y, o.x))  # reading order, top to bottom
        return "I see " + ", ".join(f"{o.name} at {at(o)}" for o in counted) + "."
    named = sorted((q.question.index(o.name), o) for o in scene.objects if o.name in q.question)
    if named:
        return " ".join(f"The {o.name} is at {at(o)} size {_size_word(o)}." for _, o in named)
    for o in scene.objects:  # "What color is the circle?" / "What shape is the red object?"
        for term in (f"the {o.shape}", f"the {o.color} object"):
            if term in q.question:
                return f"{term[0].upper()}{term[1:]} is at {at(o)}."
    raise ValueError(f"question names no object of its scene: {q.question!r}")


def make_question(
    rng: random.Random,
    question_type: str | None = None,
    image_size: int = 112,
    same_shape_sizes: bool = False,
) -> SyntheticQuestion:
    """One SAT-style question of a type (SELECTABLE_QUESTION_TYPES, or MOTION_TYPE for a two-image
    one); a type of QUESTION_TYPES is drawn uniformly when none is given. same_shape_sizes: size and
    depth questions compare two objects of one shape."""
    qtype = question_type or rng.choice(QUESTION_TYPES)
    if qtype == "color":
        return _color_question(rng, image_size)
    if qtype == "shape":
        return _shape_question(rng, image_size)
    if qtype == "count":
        return _count_question(rng, image_size)
    if qtype == "left_right":
        return _relation_question(rng, image_size, "x")
    if qtype == "above_below":
        return _relation_question(rng, image_size, "y")
    if qtype == "size":
        return _size_question(rng, image_size, same_shape=same_shape_sizes)
    if qtype == "depth":
        return _size_question(rng, image_size, SAT_DEPTH_TEMPLATE, same_shape_sizes, "depth")
    if qtype == MOTION_TYPE:
        return make_motion_question(rng, image_size)
    known = SELECTABLE_QUESTION_TYPES + (MOTION_TYPE,)
    raise InputError(f"unknown question_type {qtype!r}; expected one of {known}")


def make_cvbench_question(
    rng: random.Random, task: str, image_size: int = 112, same_shape_sizes: bool = False
) -> SyntheticQuestion:
    """One CV-Bench-style question for a task (Count, Relation, Depth, Distance). same_shape_sizes:
    Depth questions compare two objects of one shape."""
    if task == "Count":
        q = _count_question(rng, image_size, CVBENCH_COUNT_TEMPLATES)
    elif task == "Relation":
        q = _relation_question(rng, image_size, rng.choice(("x", "y")), CVBENCH_RELATION_TEMPLATE)
    elif task == "Depth":
        q = _size_question(rng, image_size, CVBENCH_DEPTH_TEMPLATE, same_shape_sizes)
    elif task == "Distance":
        q = _distance_question(rng, image_size)
    else:
        raise InputError(f"unknown CV-Bench task {task!r}")
    return replace(q, question_type=task)


# ---------------------------------------------------------------- file writers


def sat_features():
    """The columns of HF `array/SAT` (image_bytes decodes to a list of PIL images)."""
    # Imported here: scenes and questions do not need `datasets` (a slow import).
    from datasets import Features, Image, Sequence, Value

    return Features(
        {
            "image_bytes": Sequence(Image()),
            "question": Value("string"),
            "answers": Sequence(Value("string")),
            "question_type": Value("string"),
            "correct_answer": Value("string"),
        }
    )


def cvbench_features():
    """The CV-Bench columns the loaders use (the published files carry a few more)."""
    from datasets import Features, Image, Sequence, Value

    return Features(
        {
            "idx": Value("int64"),
            "type": Value("string"),
            "task": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "choices": Sequence(Value("string")),
            "answer": Value("string"),
            "prompt": Value("string"),
            "source": Value("string"),
        }
    )


def _row_rng(seed: int, name: str, row: int) -> random.Random:
    # A string seed is hashed with SHA-512: stable across runs and Python processes.
    return random.Random(f"vtr-synthetic/{seed}/{name}/{row}")


def _image_item(scene: Scene) -> dict:
    return {"bytes": scene_png(scene), "path": None}


def sat_row(q: SyntheticQuestion) -> dict:
    """One question as a row of HF `array/SAT` (the `sat_features` columns)."""
    return {
        "image_bytes": [_image_item(s) for s in q.scenes],
        "question": q.question,
        "answers": list(q.answers),
        "question_type": q.question_type,
        "correct_answer": q.correct_answer,
    }


def check_subset(given: tuple[str, ...] | list[str] | None, known: tuple[str, ...], what: str) -> None:
    if given is not None and (not given or any(g not in known for g in given)):
        raise InputError(f"{what} must be a non-empty subset of {list(known)}, got {list(given)}")


def sat_columns(
    n: int,
    split: str,
    seed: int = 0,
    image_size: int = 112,
    multi_image: bool = False,
    question_types: tuple[str, ...] | None = None,
    same_shape_sizes: bool = False,
) -> dict[str, list]:
    """The columns of n SAT rows; with multi_image, one row in MULTI_IMAGE_EVERY has two images.

    question_types: draw the one-image questions from these types only (default: all of
    QUESTION_TYPES; the rows are then the same as before the option existed). same_shape_sizes:
    size questions compare two objects of one shape.
    """
    check_subset(question_types, SELECTABLE_QUESTION_TYPES, "question_types")
    cols: dict[str, list] = {k: [] for k in sat_features()}
    for i in range(n):
        rng = _row_rng(seed, f"sat-{split}", i)
        # Row 3, 23, 43, ...: even a small file gets a two-image row for the loader to skip.
        two = multi_image and i % MULTI_IMAGE_EVERY == 3
        qtype = rng.choice(question_types) if question_types and not two else None
        q = (
            make_motion_question(rng, image_size)
            if two
            else make_question(rng, qtype, image_size, same_shape_sizes)
        )
        for key, value in sat_row(q).items():
            cols[key].append(value)
    return cols


def cvbench_columns(
    tasks: list[str],
    sources: list[str],
    first_idx: int,
    seed: int,
    image_size: int,
    same_shape_sizes: bool = False,
):
    cols: dict[str, list] = {k: [] for k in cvbench_features()}
    for j, (task, source) in enumerate(zip(tasks, sources, strict=True)):
        idx = first_idx + j
        q = make_cvbench_question(_row_rng(seed, "cvbench", idx), task, image_size, same_shape_sizes)
        cols["idx"].append(idx)
        cols["type"].append("2D" if task in CVBENCH_2D_TASKS else "3D")
        cols["task"].append(task)
        cols["image"].append(_image_item(q.scenes[0]))
        cols["question"].append(q.question)
        cols["choices"].append(list(q.answers))
        cols["answer"].append(f"({chr(ord('A') + q.answers.index(q.correct_answer))})")
        cols["prompt"].append(cvbench_prompt(q.question, q.answers))
        cols["source"].append(source)
    return cols


def write_parquet(cols: dict[str, list], features, path: Path) -> int:
    """Columns as a parquet file with the given HF features (parent folders made); the row count."""
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(cols, features=features).to_parquet(str(path))
    return len(next(iter(cols.values())))


def write_sat(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    n_static: int | None = None,
    seed: int = 0,
    image_size: int = 112,
    question_types: tuple[str, ...] | None = None,
    same_shape_sizes: bool = False,
) -> dict[str, dict[str, int]]:
    """SAT_{train,val,test,static}.parquet in out_dir. Only train has two-image rows (about 5%)."""
    out = Path(out_dir)
    n_static = n_train if n_static is None else n_static
    sizes = {"train": n_train, "val": n_val, "test": n_test, "static": n_static}
    written = {}
    for split, n in sizes.items():
        cols = sat_columns(n, split, seed, image_size, split == "train", question_types, same_shape_sizes)
        name = f"SAT_{split}.parquet"
        rows = write_parquet(cols, sat_features(), out / name)
        written[name] = {"rows": rows, "two_image_rows": sum(len(x) > 1 for x in cols["image_bytes"])}
    return written


def _cvbench_plan(n: int, tasks: tuple[str, ...] | None = None) -> tuple[list, list, list, list]:
    """Tasks and sources of n CV-Bench rows: half 2D (then 3D), tasks and 2D sources alternating.

    With `tasks`, rows cycle through those tasks only (2D rows still first)."""
    if tasks is not None:
        cycle = [tasks[i % len(tasks)] for i in range(n)]
        tasks_2d = [t for t in cycle if t in CVBENCH_2D_TASKS]
        tasks_3d = [t for t in cycle if t not in CVBENCH_2D_TASKS]
    else:
        n2d = (n + 1) // 2
        tasks_2d = [CVBENCH_2D_TASKS[i % 2] for i in range(n2d)]
        tasks_3d = [CVBENCH_3D_TASKS[i % 2] for i in range(n - n2d)]
    sources_2d = [("ADE20K", "COCO")[(i // 2) % 2] for i in range(len(tasks_2d))]
    return tasks_2d, sources_2d, tasks_3d, ["Omni3D"] * len(tasks_3d)


def write_cvbench(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 112,
    layout: str = "split",
    tasks: tuple[str, ...] | None = None,
    same_shape_sizes: bool = False,
) -> dict[str, dict[str, int]]:
    """CV-Bench files in out_dir: test_2d.parquet + test_3d.parquet ("split", the current hub
    layout) or one test.parquet ("single", the older layout). idx runs 0..n-1, 2D rows first.
    `tasks`: only these CV-Bench tasks (default: all four, balanced)."""
    if layout not in ("split", "single"):
        raise InputError(f"layout must be 'split' or 'single', got {layout!r}")
    check_subset(tasks, CVBENCH_2D_TASKS + CVBENCH_3D_TASKS, "tasks")
    tasks_2d, sources_2d, tasks_3d, sources_3d = _cvbench_plan(n, tasks)
    if layout == "split" and not (tasks_2d and tasks_3d):  # an empty parquet cannot be loaded
        raise InputError(
            f"the split CV-Bench layout needs 2D and 3D rows (got {len(tasks_2d)} and {len(tasks_3d)}); "
            "use layout='single' for fewer rows or tasks of one kind"
        )
    out = Path(out_dir)
    cols_2d = cvbench_columns(tasks_2d, sources_2d, 0, seed, image_size, same_shape_sizes)
    cols_3d = cvbench_columns(tasks_3d, sources_3d, len(tasks_2d), seed, image_size, same_shape_sizes)
    if layout == "single":
        cols = {k: cols_2d[k] + cols_3d[k] for k in cols_2d}
        return {"test.parquet": {"rows": write_parquet(cols, cvbench_features(), out / "test.parquet")}}
    return {
        "test_2d.parquet": {"rows": write_parquet(cols_2d, cvbench_features(), out / "test_2d.parquet")},
        "test_3d.parquet": {"rows": write_parquet(cols_3d, cvbench_features(), out / "test_3d.parquet")},
    }


def make_synthetic(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 112,
    n_val: int | None = None,
    cvbench_layout: str = "split",
    question_types: tuple[str, ...] | None = None,
    cvbench_tasks: tuple[str, ...] | None = None,
    same_shape_sizes: bool = False,
) -> dict:
    """Write out_dir/SAT/ (train, val, test, static) and out_dir/CV-Bench/ (n_test rows).

    n_val defaults to n_test; SAT_static gets n_train one-image rows. `question_types` and
    `cvbench_tasks` narrow the data to some families (a focused run); when CV-Bench then holds only
    2D or only 3D tasks it is written as one test.parquet. `same_shape_sizes`: SAT size and CV-Bench
    Depth questions compare two objects of one shape, so no shape prior can answer them.
    Prints one line per file and returns
    {"out_dir", "files": {relative path: {"rows", ...}}}.
    """
    out = Path(out_dir)
    n_val = n_test if n_val is None else n_val
    sat = write_sat(
        out / "SAT", n_train, n_val, n_test, seed=seed, image_size=image_size, question_types=question_types,
        same_shape_sizes=same_shape_sizes,
    )  # fmt: skip
    files = {f"SAT/{name}": info for name, info in sat.items()}
    if len({t in CVBENCH_2D_TASKS for t in cvbench_tasks or ()}) == 1:
        cvbench_layout = "single"  # only 2D or only 3D tasks: the split layout would leave a file empty
    cvb = write_cvbench(
        out / "CV-Bench", n_test, seed, image_size, cvbench_layout, cvbench_tasks, same_shape_sizes
    )
    for name, info in cvb.items():
        files[f"CV-Bench/{name}"] = info
    for rel, info in files.items():
        extra = f", {info['two_image_rows']} two-image" if info.get("two_image_rows") else ""
        size_kb = (out / rel).stat().st_size / 1024
        print(f"[synthetic] {out / rel}: {info['rows']} rows{extra}, {size_kb:.0f} KiB")
    return {"out_dir": str(out), "files": files}


def add_family_options(p: argparse.ArgumentParser) -> None:
    """--question-types / --cvbench-tasks, shared by this module's CLI and `make-synthetic`."""
    p.add_argument(
        "--question-types", nargs="+", choices=SELECTABLE_QUESTION_TYPES, default=None,
        help=f"SAT question types to draw (default: {', '.join(QUESTION_TYPES)}; 'depth', a size pair "
        "asked as 'closer to the camera', only when named)",
    )  # fmt: skip
    p.add_argument(
        "--cvbench-tasks", nargs="+", choices=CVBENCH_2D_TASKS + CVBENCH_3D_TASKS, default=None,
        help="CV-Bench tasks to draw (default: all four)",
    )  # fmt: skip
    p.add_argument(
        "--same-shape-sizes", action="store_true",
        help="SAT size/depth and CV-Bench Depth questions compare two objects of ONE shape, so the shape "
        "names cannot predict the answer (by default the two shapes are drawn freely)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic SAT and CV-Bench parquet files.")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--cvbench-layout", choices=("split", "single"), default="split")
    add_family_options(p)
    a = p.parse_args(argv)
    make_synthetic(
        a.out_dir, a.n_train, a.n_test, a.seed, a.image_size, a.n_val, a.cvbench_layout,
        a.question_types, a.cvbench_tasks, a.same_shape_sizes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
