"""Vocabulary and caption grammar of the procedural `shapes` data set (spec: shared/SHAPES.md).

This module has no dependencies beyond the standard library, so an evaluator can import the
vocabulary and `parse_caption` without pulling in numpy, PIL or torch.

A caption is described by a *caption spec*, the dict that `parse_caption` returns and that
`compose_caption` turns back into text:

    {"type": "single" | "pair" | "count",
     "prefix": "" | "a picture of " | "an image of " | "a drawing of ",
     "objects": [{"color": str, "shape": str, "size": str | None, "position": str | None}, ...],
     "relation": str | None,   # pair only
     "number": int | None}     # count only (2, 3 or 4)

`objects` holds one entry for "single" and "count" (the count scene repeats it `number` times) and
two for "pair", in caption order (subject first). `size` and `position` are None where the
caption does not state them; only "single" captions can state them.
"""
from __future__ import annotations

import re

# Colour name -> RGB, exactly the table of SHAPES.md.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 210, 0),
    "green": (30, 160, 60),
    "cyan": (0, 190, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "black": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
SIZES: tuple[str, ...] = ("small", "large")
# Box side in pixels at a 64 px canvas; scaled by S/64 for other canvas sides.
SIZE_PX_AT_64: dict[str, int] = {"small": 16, "large": 28}

# Position phrase -> (column, row) in the 3x3 grid; 0, 1, 2 = left/top, middle, right/bottom.
POSITIONS: dict[str, tuple[int, int]] = {
    "in the top left": (0, 0),
    "at the top": (1, 0),
    "in the top right": (2, 0),
    "on the left": (0, 1),
    "in the center": (1, 1),
    "on the right": (2, 1),
    "in the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right": (2, 2),
}
CELL_TO_POSITION: dict[tuple[int, int], str] = {cell: p for p, cell in POSITIONS.items()}
COLUMNS: tuple[str, ...] = ("left", "middle", "right")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")

# "A RELATION B": the subject A is to the left of / right of / above / below the reference B.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS: dict[int, str] = {n: w for w, n in NUMBERS.items()}
PREFIXES: tuple[str, ...] = ("", "a picture of ", "an image of ", "a drawing of ")
SCENE_TYPES: tuple[str, ...] = ("single", "pair", "count")

# Colour-shape pairs that never occur in the train split (zero-shot composition test).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("purple", "circle"), ("orange", "square"), ("cyan", "triangle"),
    ("red", "diamond"), ("green", "star"), ("yellow", "cross"),
})


def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT_PAIRS


def article(next_word: str) -> str:
    """'a' or 'an' before `next_word`; every vowel-initial word of this vocabulary has a vowel sound."""
    return "an" if next_word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def compose_caption(spec: dict) -> str:
    """Caption text of a caption spec (see the module docstring); the inverse of `parse_caption`."""
    kind, objects = spec["type"], spec["objects"]
    if spec["prefix"] not in PREFIXES:
        raise ValueError(f"caption prefix {spec['prefix']!r} is not one of {PREFIXES}")
    if kind == "single":
        (obj,) = objects
        words = [obj["size"], obj["color"], obj["shape"], obj["position"]]
        body = with_article(" ".join(w for w in words if w is not None))
    elif kind == "pair":
        first, second = objects
        if spec["relation"] not in RELATIONS:
            raise ValueError(f"pair relation {spec['relation']!r} is not one of {RELATIONS}")
        body = (f"{with_article(first['color'] + ' ' + first['shape'])} {spec['relation']} "
                f"{with_article(second['color'] + ' ' + second['shape'])}")
    elif kind == "count":
        (obj,) = objects
        body = f"{NUMBER_WORDS[spec['number']]} {obj['color']} {PLURALS[obj['shape']]}"
    else:
        raise ValueError(f"scene type {kind!r} is not one of {SCENE_TYPES}")
    return spec["prefix"] + body


def _alternatives(words) -> str:
    # Longest first, so that no alternative is cut short by a shorter one sharing its start.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR = f"({_alternatives(COLORS)})"
_SHAPE = f"({_alternatives(SHAPES)})"
_PREFIX = f"({_alternatives(p for p in PREFIXES if p)})?"
_SINGLE_RE = re.compile(
    f"{_PREFIX}(a|an) (?:({_alternatives(SIZES)}) )?{_COLOR} {_SHAPE}(?: ({_alternatives(POSITIONS)}))?")
_PAIR_RE = re.compile(
    f"{_PREFIX}(a|an) {_COLOR} {_SHAPE} ({_alternatives(RELATIONS)}) (a|an) {_COLOR} {_SHAPE}")
_COUNT_RE = re.compile(
    f"{_PREFIX}({_alternatives(NUMBERS)}) {_COLOR} ({_alternatives(PLURALS.values())})")
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _check_article(caption: str, used: str, next_word: str) -> None:
    if used != article(next_word):
        raise ValueError(f"caption {caption!r} does not match the shapes grammar: "
                         f"expected {article(next_word)!r} before {next_word!r}, got {used!r}")


def _object(color: str, shape: str, size: str | None = None, position: str | None = None) -> dict:
    return {"color": color, "shape": shape, "size": size, "position": position}


def parse_caption(caption: str) -> dict:
    """Caption spec (see the module docstring) of a caption of the shapes grammar.

    Raises ValueError naming the caption when it does not follow the grammar exactly (lower case,
    single spaces, no final period, correct a/an).
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    if m := _SINGLE_RE.fullmatch(caption):
        prefix, art, size, color, shape, position = m.groups()
        _check_article(caption, art, size or color)
        return {"type": "single", "prefix": prefix or "",
                "objects": [_object(color, shape, size, position)], "relation": None, "number": None}
    if m := _PAIR_RE.fullmatch(caption):
        prefix, art1, color1, shape1, relation, art2, color2, shape2 = m.groups()
        _check_article(caption, art1, color1)
        _check_article(caption, art2, color2)
        return {"type": "pair", "prefix": prefix or "",
                "objects": [_object(color1, shape1), _object(color2, shape2)],
                "relation": relation, "number": None}
    if m := _COUNT_RE.fullmatch(caption):
        prefix, number, color, plural = m.groups()
        return {"type": "count", "prefix": prefix or "",
                "objects": [_object(color, _SINGULAR[plural])], "relation": None,
                "number": NUMBERS[number]}
    raise ValueError(
        f"caption {caption!r} does not match the shapes grammar (SHAPES.md): expected "
        "'[PREFIX ]a[n] [SIZE ]COLOR SHAPE[ POSITION]', 'a[n] COLOR SHAPE RELATION a[n] COLOR SHAPE' "
        "or 'NUMBER COLOR SHAPEs', lower case, single spaces, no final period")
