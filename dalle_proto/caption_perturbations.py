"""Caption perturbations through the shapes grammar: a caption with one attribute changed.

    perturb_caption("a red circle to the left of a blue square", rng, exchanges=True)
    -> e.g. "a blue circle to the left of a red square"

Used as hard negatives twice: by CLIP training (clip_training.py: a caption that differs from the
true one in a single word, so a bag of words cannot tell them apart) and by the transformer's
caption-contrast loss (transformer_loss.py: the image's likelihood under its own caption must
beat its likelihood under the perturbed one). A perturbation never names a held-out colour-shape
pair (SHAPES.md: those never appear in training captions); a caption outside the grammar gets None.
`perturb_binding` draws only the hard negatives: what one-sample models get wrong (BENCHMARKS.md,
"what pairs get wrong": the second object copies the first; counts ignore the number word).
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable

import numpy as np

from dalle_proto.datasets.shapes_grammar import (COLORS, NUMBERS, POSITIONS, RELATIONS, SHAPES, SIZES,
                                                 compose_caption, is_held_out, parse_caption)

# "A RELATION B" says what "B CONVERSE A" says
CONVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


def perturb_caption(caption: str, rng: np.random.Generator, allow_held_out: bool = False,
                    exchanges: bool = False, copies: bool = False) -> str | None:
    """The caption with one attribute changed (see the module docstring); None when the caption is
    not of the shapes grammar or no valid change was found. `exchanges`: a pair may also get its two
    objects' colours or shapes exchanged. `copies`: instead, a pair gets one object's colour or shape
    copied onto the other, which may leave two identical objects (never a training caption, but
    what sampled pairs often show); other captions get None."""
    spec = _parse(caption)
    if spec is None or (copies and spec["type"] != "pair"):
        return None
    change = _copy_one if copies else partial(_change_one, exchanges=exchanges)
    return _first_valid(spec, caption, rng, change, allow_held_out, distinct_pair=not copies)


def perturb_binding(caption: str, rng: np.random.Generator, allow_held_out: bool = False,
                    exchanges_only: bool = False) -> str | None:
    """A binding negative: a pair gets its colours or shapes exchanged, or one object's colour or
    shape copied onto the other; a count gets another number; a single object another colour or
    shape. None outside the grammar or when no valid change was found (held-out pairs as above).
    `exchanges_only`: only a pair's exchanged colours or shapes, the one negative a bag of words
    cannot reject; every other caption gets None."""
    spec = _parse(caption)
    if spec is None or (exchanges_only and spec["type"] != "pair"):
        return None
    change = partial(_change_binding, exchanges_only=exchanges_only)
    return _first_valid(spec, caption, rng, change, allow_held_out, distinct_pair=False)


def converse_caption(caption: str) -> str | None:
    """A pair caption said the other way round, same scene: "a red circle below a blue square" ->
    "a blue square above a red circle" (prefix kept); None for any other caption."""
    spec = _parse(caption)
    if spec is None or spec["type"] != "pair":
        return None
    spec["objects"], spec["relation"] = spec["objects"][::-1], CONVERSE[spec["relation"]]
    return compose_caption(spec)


def _parse(caption: str) -> dict | None:
    try:
        return parse_caption(caption)
    except ValueError:
        return None


def _first_valid(spec: dict, caption: str, rng: np.random.Generator,
                 change: Callable[[dict, np.random.Generator], None], allow_held_out: bool,
                 distinct_pair: bool) -> str | None:
    """Up to 10 tries of `change` on a copy of `spec`: the first caption that differs from `caption`,
    names no held-out pair (unless allowed) and, with `distinct_pair`, keeps a pair's two objects
    apart (the grammar's pairs differ in colour or shape); None if every try fails."""
    for _ in range(10):
        new = copy.deepcopy(spec)
        change(new, rng)
        pairs = [(o["color"], o["shape"]) for o in new["objects"]]
        if distinct_pair and new["type"] == "pair" and pairs[0] == pairs[1]:
            continue
        if not allow_held_out and any(is_held_out(*p) for p in pairs):
            continue
        text = compose_caption(new)
        if text != caption:
            return text
    return None


def _copy_one(spec: dict, rng: np.random.Generator) -> None:
    """A pair's colour or shape copied from one object onto the other, in place."""
    key, source = ("color", "shape")[rng.integers(2)], int(rng.integers(2))
    spec["objects"][1 - source][key] = spec["objects"][source][key]


def _change_binding(spec: dict, rng: np.random.Generator, exchanges_only: bool) -> None:
    """perturb_binding's change, in place: a pair's colours or shapes exchanged or copied, a count's
    number, a single object's colour or shape."""
    objects = spec["objects"]
    key = ("color", "shape")[rng.integers(2)]
    if spec["type"] == "pair":
        if exchanges_only or rng.integers(2):
            objects[0][key], objects[1][key] = objects[1][key], objects[0][key]
        else:
            source = int(rng.integers(2))
            objects[1 - source][key] = objects[source][key]
    elif spec["type"] == "count":
        spec["number"] = _other(rng, list(NUMBERS.values()), spec["number"])
    else:
        objects[0][key] = _other(rng, list(COLORS if key == "color" else SHAPES), objects[0][key])


def _change_one(spec: dict, rng: np.random.Generator, exchanges: bool) -> None:
    """Change one attribute of a parsed caption in place (a colour, a shape, the size, the position,
    the relation, the objects' order, the number; with `exchanges`, a pair's colours or shapes)."""
    objects = spec["objects"]
    changes = ["color", "shape"]
    if spec["type"] == "single":
        changes += [k for k in ("size", "position") if objects[0][k] is not None]
    elif spec["type"] == "pair":
        # which object is where and which colour goes with which shape: what a bag of words
        # cannot see, and what sampled pairs get wrong
        changes += ["relation", "swap"] + (["swap_colors", "swap_shapes"] if exchanges else [])
    else:
        changes += ["number"]
    change = changes[rng.integers(len(changes))]
    obj = objects[rng.integers(len(objects))]
    options = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
    if change in options:
        obj[change] = _other(rng, options[change], obj[change])
    elif change == "relation":
        spec["relation"] = _other(rng, list(RELATIONS), spec["relation"])
    elif change in ("swap_colors", "swap_shapes"):
        key = change[len("swap_"):-1]
        objects[0][key], objects[1][key] = objects[1][key], objects[0][key]
    elif change == "number":
        spec["number"] = _other(rng, list(NUMBERS.values()), spec["number"])
    else:
        spec["objects"] = objects[::-1]


def _other(rng: np.random.Generator, options: list, current: Any) -> Any:
    choices = [o for o in options if o != current]
    return choices[rng.integers(len(choices))]
