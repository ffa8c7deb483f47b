"""The procedural `shapes` text-image data set (spec: shared/SHAPES.md): scene sampling,
ground truth, `ShapesDataset` and `write_shapes`.

A scene is a pure function of (seed, index, size, split). Its random draws come from a private
PCG64 stream keyed by [seed, index, split code]; integers are drawn from the raw 64-bit output
by rejection, because NumPy guarantees the SeedSequence/PCG64 bit stream across versions and
machines but not the output of `Generator` methods.

Splits:
- "train": the six HELD_OUT_PAIRS never occur, in any object of any scene type, nor in a caption.
- "eval": every colour-shape pair is legal, and in addition every scene whose index is a
  multiple of HELD_OUT_EVAL_EVERY (= 6, so 1/6 of the scenes, index 0 included) is forced to
  contain a held-out pair: the single object, one of the two pair objects (either one at
  random), or the counted objects. `truth["held_out"]` says whether a scene holds one.

Ground truth (`Scene.truth`, written as NNNNNN.json by `write_shapes`) is JSON-serialisable:
    {"type": "single" | "pair" | "count",
     "objects": [{"color", "shape", "size": "small" | "large",
                  "box": [x0, y0, x1, y1],    # pixels, the object covers x0 <= x < x1, y0 <= y < y1
                  "cell": [column, row],      # 0..2, grid cell of nearest centre (cell_of_box)
                  "position": phrase}, ...],  # POSITIONS phrase of that cell
     "relation": str | None, "number": int | None, "held_out": bool,
     "image_size": S, "seed": seed, "index": index, "split": split}
Objects are in caption order (pair: subject first); a count scene lists `number` objects.
"""
from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dalle_proto.datasets.shapes_grammar import (  # noqa: F401  (re-exported for evaluators)
    CELL_TO_POSITION, COLORS, HELD_OUT_PAIRS, NUMBERS, POSITIONS, PREFIXES, RELATIONS, SHAPES,
    SIZES, compose_caption, is_held_out, parse_caption)
from dalle_proto.datasets.shapes_render import (  # noqa: F401
    box_side, cell_of_box, check_canvas_size, draw_objects, grid_centre, scaled_px)

__all__ = [
    "Scene", "ShapesDataset", "render_scene", "render_caption", "sample_scene", "write_shapes",
    "parse_caption", "compose_caption", "cell_of_box", "draw_objects", "is_held_out",
    "COLORS", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "NUMBERS", "PREFIXES", "HELD_OUT_PAIRS",
    "HELD_OUT_EVAL_EVERY", "SPLITS", "MIX_PERCENT"]

SPLITS: dict[str, int] = {"train": 0, "eval": 1}  # split name -> code in the RNG key
_CAPTION_RENDER_CODE = 2  # third RNG key element of render_caption: never a split code
HELD_OUT_EVAL_EVERY = 6
MIX_PERCENT: dict[str, int] = {"single": 50, "pair": 35, "count": 15}  # training mix
JITTER_PX_AT_64 = 2  # max jitter of a single object around its grid centre
PAIR_MAX_OFFSET_PX_AT_64 = 8  # max centre offset of a pair across its relation's axis
PAIR_MIN_GAP_PX_AT_64 = 2  # min gap between a pair's boxes along its relation's axis
COUNT_MIN_GAP_PX_AT_64 = 2  # min gap between the boxes of a count scene

_ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
_TRAIN_COMBOS = tuple(combo for combo in _ALL_COMBOS if combo not in HELD_OUT_PAIRS)
_HELD_OUT_COMBOS = tuple(sorted(HELD_OUT_PAIRS))  # sorted: set order would vary per process
_POSITION_PHRASES = tuple(POSITIONS)


@dataclass
class Scene:
    image: Image.Image  # RGB, size x size
    caption: str
    truth: dict  # JSON-serialisable ground truth (see the module docstring)


class _Rng:
    """Integer draws from a PCG64 bit stream, stable across NumPy versions and machines."""

    def __init__(self, key: list[int]):
        self._bits = np.random.PCG64(np.random.SeedSequence(key))

    def below(self, n: int) -> int:
        """Uniform integer in [0, n), unbiased (rejects the top partial block of 2**64)."""
        limit = (2**64 // n) * n
        while True:
            r = int(self._bits.random_raw())
            if r < limit:
                return r % n

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high], both ends included."""
        return low + self.below(high - low + 1)

    def choice(self, options):
        return options[self.below(len(options))]


def _check_key(seed, index, split) -> tuple[int, int, int]:
    seed, index = operator.index(seed), operator.index(index)
    if seed < 0 or index < 0:
        raise ValueError(f"shapes seed and index must be >= 0, got seed={seed}, index={index}")
    if split not in SPLITS:
        raise ValueError(f"shapes split {split!r} is not one of {tuple(SPLITS)}")
    return seed, index, SPLITS[split]


# ---------------------------------------------------------------- what the caption says

def check_mix(mix) -> dict[str, int]:
    """A training mix as {"single", "pair", "count"} -> whole percent summing to 100 (a list of
    three is read in that order); None is SHAPES.md's MIX_PERCENT."""
    if mix is None:
        return MIX_PERCENT
    values = list(mix.values()) if isinstance(mix, dict) else list(mix)
    if isinstance(mix, dict) and list(mix) != list(MIX_PERCENT):
        raise ValueError(f"shapes mix keys must be {list(MIX_PERCENT)}, got {list(mix)}")
    if (len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)
            or sum(values) != 100):
        raise ValueError(f"shapes mix must be three whole percentages (single, pair, count) >= 0 summing "
                         f"to 100, got {mix!r}")
    return dict(zip(MIX_PERCENT, values))


def _sample_caption_spec(rng: _Rng, split: str, force_held_out: bool,
                         mix: dict[str, int] = MIX_PERCENT) -> dict:
    """A caption spec (shapes_grammar's format): scene type, prefix and the stated attributes."""
    combos = _TRAIN_COMBOS if split == "train" else _ALL_COMBOS
    draw = rng.below(100)
    kind = "single" if draw < mix["single"] else (
        "pair" if draw < mix["single"] + mix["pair"] else "count")
    spec = {"type": kind, "prefix": rng.choice(PREFIXES), "relation": None, "number": None}
    if kind == "single":
        color, shape = rng.choice(_HELD_OUT_COMBOS if force_held_out else combos)
        size = rng.choice(SIZES) if rng.below(2) else None
        position = rng.choice(_POSITION_PHRASES) if rng.below(2) else None
        spec["objects"] = [_caption_object(color, shape, size, position)]
    elif kind == "pair":
        spec["relation"] = rng.choice(RELATIONS)
        forced_slot = rng.below(2) if force_held_out else None
        while True:  # the two objects differ in colour or shape (or both)
            pair = [rng.choice(_HELD_OUT_COMBOS if slot == forced_slot else combos) for slot in (0, 1)]
            if pair[0] != pair[1]:
                break
        spec["objects"] = [_caption_object(color, shape) for color, shape in pair]
    else:
        spec["number"] = rng.choice(tuple(NUMBERS.values()))
        color, shape = rng.choice(_HELD_OUT_COMBOS if force_held_out else combos)
        spec["objects"] = [_caption_object(color, shape)]
    return spec


def _caption_object(color, shape, size=None, position=None) -> dict:
    return {"color": color, "shape": shape, "size": size, "position": position}


# ---------------------------------------------------------------- where the objects go

def _truth_object(color: str, shape: str, size_name: str, box: list[int], size: int) -> dict:
    cell = cell_of_box(box, size)
    return {"color": color, "shape": shape, "size": size_name, "box": box, "cell": list(cell),
            "position": CELL_TO_POSITION[cell]}


def _place_single(rng: _Rng, obj: dict, size: int) -> dict:
    """The single object in its grid cell; a size or position the caption leaves out is drawn."""
    size_name = obj["size"] or rng.choice(SIZES)
    column, row = POSITIONS[obj["position"] or rng.choice(_POSITION_PHRASES)]
    b, jitter = box_side(size_name, size), scaled_px(JITTER_PX_AT_64, size)

    def corner(grid_index: int) -> int:
        start = int(np.floor(grid_centre(grid_index, size) - b / 2 + 0.5)) + rng.randint(-jitter, jitter)
        return min(max(start, 0), size - b)  # the box always lies inside the canvas

    x0, y0 = corner(column), corner(row)
    return _truth_object(obj["color"], obj["shape"], size_name, [x0, y0, x0 + b, y0 + b], size)


def _place_pair(rng: _Rng, spec: dict, size: int) -> list[dict]:
    """Two small objects anywhere on the canvas, the subject `relation` the reference: their boxes
    do not overlap along the relation's axis and their centres differ by at most 8 px across it.

    The boxes are also kept >= 2 px apart along the axis (stricter than SHAPES.md asks), so that
    two objects of one colour never touch and an evaluator can tell them apart.
    """
    b, highest = box_side("small", size), size - box_side("small", size)
    max_offset = scaled_px(PAIR_MAX_OFFSET_PX_AT_64, size)
    gap = scaled_px(PAIR_MIN_GAP_PX_AT_64, size)
    while True:  # uniform over the corner pairs that keep the boxes apart along the axis
        lower, upper = rng.randint(0, highest), rng.randint(0, highest)
        if upper - lower >= b + gap:
            break
    while True:  # uniform over cross-axis corner pairs at most max_offset apart
        across_subject = rng.randint(0, highest)
        across_reference = across_subject + rng.randint(-max_offset, max_offset)
        if 0 <= across_reference <= highest:
            break
    subject_first = spec["relation"] in ("to the left of", "above")  # smaller x / smaller y
    along_subject, along_reference = (lower, upper) if subject_first else (upper, lower)
    horizontal = spec["relation"] in ("to the left of", "to the right of")
    placed = []
    for obj, along, across in zip(spec["objects"], (along_subject, along_reference),
                                  (across_subject, across_reference)):
        x0, y0 = (along, across) if horizontal else (across, along)
        placed.append(_truth_object(obj["color"], obj["shape"], "small", [x0, y0, x0 + b, y0 + b], size))
    return placed


def _boxes_apart(a: list[int], b: list[int], gap: int) -> bool:
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= gap


def _place_count(rng: _Rng, spec: dict, size: int) -> list[dict]:
    """`number` small objects anywhere on the canvas, boxes at least 2 px apart."""
    b, gap = box_side("small", size), scaled_px(COUNT_MIN_GAP_PX_AT_64, size)
    highest = size - b
    while True:  # sequential rejection; restart from scratch if a crowded canvas gets stuck
        boxes: list[list[int]] = []
        for _ in range(200 * spec["number"]):
            x0, y0 = rng.randint(0, highest), rng.randint(0, highest)
            box = [x0, y0, x0 + b, y0 + b]
            if all(_boxes_apart(box, other, gap) for other in boxes):
                boxes.append(box)
                if len(boxes) == spec["number"]:
                    obj = spec["objects"][0]
                    return [_truth_object(obj["color"], obj["shape"], "small", box, size) for box in boxes]


def _realise(rng: _Rng, spec: dict, size: int) -> dict:
    """Ground truth of a caption spec: every object with its size, box and cell."""
    if spec["type"] == "single":
        objects = [_place_single(rng, spec["objects"][0], size)]
    elif spec["type"] == "pair":
        objects = _place_pair(rng, spec, size)
    else:
        objects = _place_count(rng, spec, size)
    return {"type": spec["type"], "objects": objects, "relation": spec["relation"],
            "number": spec["number"],
            "held_out": any(is_held_out(o["color"], o["shape"]) for o in objects),
            "image_size": size}


# ---------------------------------------------------------------- public API

def sample_scene(seed: int, index: int, size: int = 64, split: str = "train",
                 mix=None) -> tuple[str, dict]:
    """(caption, truth) of scene `index` without drawing its pixels (cheap; used by `captions`).
    `mix` (see `check_mix`) replaces SHAPES.md's 50/35/15 draw of the scene type; None keeps it."""
    seed, index, split_code = _check_key(seed, index, split)
    check_canvas_size(size)
    rng = _Rng([seed, index, split_code])
    force_held_out = split == "eval" and index % HELD_OUT_EVAL_EVERY == 0
    spec = _sample_caption_spec(rng, split, force_held_out, check_mix(mix))
    truth = _realise(rng, spec, size)
    truth.update(seed=seed, index=index, split=split)
    return compose_caption(spec), truth


def render_scene(seed: int, index: int, size: int = 64, split: str = "train", mix=None) -> Scene:
    """Scene `index` of the (seed, split[, mix]) data set on a size x size canvas; a pure function."""
    caption, truth = sample_scene(seed, index, size, split, mix)
    return Scene(image=draw_objects(truth["objects"], size), caption=caption, truth=truth)


def render_caption(caption: str, seed: int = 0, size: int = 64) -> Scene:
    """A scene that matches any caption of the grammar (held-out pairs included), e.g. a reference
    render for an evaluator's prompt. Unstated attributes and the layout are drawn from a stream
    keyed by (seed, caption), so the result is a pure function of its arguments."""
    spec = parse_caption(caption)
    check_canvas_size(size)
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"render_caption seed must be >= 0, got {seed}")
    caption_key = int.from_bytes(hashlib.sha256(caption.encode("utf-8")).digest()[:8], "little")
    rng = _Rng([seed, caption_key, _CAPTION_RENDER_CODE])
    truth = _realise(rng, spec, size)
    truth.update(seed=seed)
    return Scene(image=draw_objects(truth["objects"], size), caption=caption, truth=truth)


class ShapesDataset(torch.utils.data.Dataset):
    """`count` scenes of the shapes set, rendered on the fly (nothing touches the disk).

    Yields (PIL RGB image, caption), or (transform(image), caption) when `transform` is given.
    `mix`: the scene types' percentages (single, pair, count) instead of SHAPES.md's 50/35/15.
    """

    def __init__(self, count: int, seed: int = 0, size: int = 64, split: str = "train", transform=None,
                 mix=None):
        count = operator.index(count)
        if count < 0:
            raise ValueError(f"ShapesDataset count must be >= 0, got {count}")
        _check_key(seed, 0, split)
        check_canvas_size(size)
        self.count, self.seed, self.size, self.split, self.transform = count, seed, size, split, transform
        self.mix = None if mix is None else check_mix(mix)

    def __len__(self) -> int:
        return self.count

    def _index(self, i) -> int:
        i = operator.index(i)
        if not -self.count <= i < self.count:
            raise IndexError(f"ShapesDataset index {i} out of range for {self.count} scenes")
        return i % self.count

    def scene(self, i: int) -> Scene:
        return render_scene(self.seed, self._index(i), self.size, self.split, self.mix)

    def captions(self, i: int) -> list[str]:
        """All captions of item i: the shapes set has exactly one per image."""
        return [sample_scene(self.seed, self._index(i), self.size, self.split, self.mix)[0]]

    def __getitem__(self, i):
        scene = self.scene(i)
        image = scene.image if self.transform is None else self.transform(scene.image)
        return image, scene.caption


def write_shapes(out_dir, count: int, seed: int = 0, size: int = 64, split: str = "train",
                 progress: bool = True) -> Path:
    """Write scenes 0..count-1 as NNNNNN.png (image), NNNNNN.txt (caption + newline) and
    NNNNNN.json (ground truth) into `out_dir` (created if missing); returns its Path."""
    count = operator.index(count)
    if count < 0:
        raise ValueError(f"write_shapes count must be >= 0, got {count}")
    _check_key(seed, 0, split)
    check_canvas_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(count - 1)))
    for i in tqdm(range(count), desc=f"shapes {split}", unit="scene", disable=not progress):
        scene = render_scene(seed, i, size, split)
        stem = out / f"{i:0{width}d}"
        scene.image.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(scene.caption + "\n", encoding="utf-8")
        stem.with_suffix(".json").write_text(json.dumps(scene.truth, sort_keys=True) + "\n",
                                             encoding="utf-8")
    return out
