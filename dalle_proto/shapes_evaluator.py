"""Does an image show what its `shapes` caption says? An analytic evaluator (spec: shared/SHAPES.md).

Like GenEval for real objects, but exact: `shapes_detection` finds the objects (colour, shape,
size, box) and this module checks each attribute the caption states.

Attributes (only those a caption states are scored):
- "color", "shape": each caption object's colour (shape) is shown by a detected object; a pair
  needs distinct objects (two red things for "a red circle ... a red square").
- "color_shape": each caption object is shown by a detected object with both its colour and shape.
- "size" (single): the caption object's detection (see below) is small/large as stated; the box
  side is compared with 22 px at S = 64 (halfway between 16 and 28).
- "position" (single): that detection's box centre lies in the stated 3x3 cell (nearest of the
  cell centres at 0.25, 0.5, 0.75 of the side).
- "relation" (pair): with A, B the detections of the subject and the reference, "A left of B"
  holds when B's centre is right of A's by at least half a small box (8 px at S = 64) and by more
  than the two centres differ vertically; the other relations are the same rule turned. (The
  data set's pairs differ by >= 18 px along the axis and <= 8 px across it.)
- "count": the number of detections with the stated colour and shape equals the number.
`correct` is the whole caption: every stated attribute holds AND the image shows nothing else:
exactly one object for a single, two for a pair, N for a count.

The caption object's detection: the one that shares the most of (colour, shape) with it, larger
area breaking ties; a pair picks the best two distinct detections jointly, and its relation is
False unless each shares at least its colour or shape with its caption object.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dalle_proto.datasets.shapes_grammar import POSITIONS, SIZE_PX_AT_64, is_held_out, parse_caption
from dalle_proto.shapes_detection import Detected, detect_objects_batch, image_batch

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "color_shape", "size", "position", "relation", "count")
RELATION_MARGIN = 0.5  # of a small box side: the least centre offset along a relation's axis


@dataclass
class EvalResult:
    caption: str
    scene_type: str  # "single" | "pair" | "count"
    held_out: bool  # the caption names a held-out colour-shape pair
    attributes: dict[str, bool]  # only the attributes the caption states
    correct: bool  # the whole caption holds and nothing else is shown
    objects: list[Detected]  # what the image shows


def evaluate(image, caption: str, size: int | None = None) -> EvalResult:
    """Score one image (PIL RGB, uint8 (H, W, 3) or float (3, H, W) in [-1, 1]) against a caption
    of the shapes grammar; `size` is the canvas side the geometry refers to (default: image side)."""
    (result,) = evaluate_each(image_batch(image), [caption], size)
    return result


def evaluate_each(images, captions: list[str], size: int | None = None) -> list[EvalResult]:
    """`evaluate` for many image-caption pairs; the images are analysed as one batch."""
    captions = list(captions)
    specs = [parse_caption(c) for c in captions]  # bad captions fail before the image work
    rgb = image_batch(images)  # (B, H, W, 3)
    if len(rgb) != len(captions):
        raise ValueError(f"got {len(rgb)} images but {len(captions)} captions; expected one caption each")
    canvas = size or rgb.shape[2]
    return [_judge(caption, spec, objects, canvas) for caption, spec, objects
            in zip(captions, specs, detect_objects_batch(rgb, size))]


def evaluate_objects(objects: list[Detected], caption: str, size: int) -> EvalResult:
    """Score already detected objects (`detect_objects(image, size)`) against a caption: detect
    once, then judge any number of captions on a `size` px canvas."""
    return _judge(caption, parse_caption(caption), objects, size)


def evaluate_batch(images, captions: list[str], size: int | None = None) -> dict:
    """Accuracy of many image-caption pairs:
    {"n", "overall", "attributes": {attribute: accuracy}, "counts": {attribute: captions stating it},
     "by_type": {scene type: same keys}, "held_out": same keys, "seen": same keys}
    ("held_out": captions naming a held-out colour-shape pair; "seen": the others)."""
    return summarize(evaluate_each(images, captions, size))


def summarize(results: list[EvalResult]) -> dict:
    """The `evaluate_batch` summary of a list of results."""
    summary = _accuracies(results)
    summary["by_type"] = {kind: _accuracies([r for r in results if r.scene_type == kind])
                          for kind in ("single", "pair", "count")}
    summary["held_out"] = _accuracies([r for r in results if r.held_out])
    summary["seen"] = _accuracies([r for r in results if not r.held_out])
    return summary


def _accuracies(results: list[EvalResult]) -> dict:
    counts = Counter(a for r in results for a in r.attributes)
    hits = Counter(a for r in results for a, ok in r.attributes.items() if ok)
    return {"n": len(results),
            "overall": sum(r.correct for r in results) / len(results) if results else float("nan"),
            "attributes": {a: hits[a] / counts[a] for a in ATTRIBUTES if counts[a]},
            "counts": {a: counts[a] for a in ATTRIBUTES if counts[a]}}


# ---------------------------------------------------------------- judging one caption

def _judge(caption: str, spec: dict, objects: list[Detected], canvas: int) -> EvalResult:
    wanted = spec["objects"]
    kind = spec["type"]
    if kind == "count":
        obj = wanted[0]
        matches = sum(o.color == obj["color"] and o.shape == obj["shape"] for o in objects)
        attributes = _shown(wanted, objects)  # one of the N objects is enough for these
        attributes["count"] = matches == spec["number"]
        expected = spec["number"]
    elif kind == "single":
        attributes = _shown(wanted, objects)
        obj = wanted[0]
        subject = max(objects, key=lambda o: (_agreement(obj, o), o.area), default=None)
        if obj["size"] is not None:
            attributes["size"] = subject is not None and subject.size == obj["size"]
        if obj["position"] is not None:
            attributes["position"] = subject is not None and subject.cell == POSITIONS[obj["position"]]
        expected = 1
    else:
        attributes = _shown(wanted, objects)
        attributes["relation"] = _relation_holds(spec, objects, canvas)
        expected = 2
    held_out = any(is_held_out(o["color"], o["shape"]) for o in spec["objects"])
    correct = all(attributes.values()) and len(objects) == expected
    return EvalResult(caption=caption, scene_type=kind, held_out=held_out, attributes=attributes,
                      correct=correct, objects=objects)


def _shown(wanted: list[dict], objects: list[Detected]) -> dict[str, bool]:
    """color / shape / color_shape: every wanted value is shown by its own detection."""
    def covered(key) -> bool:
        need = Counter(key(w["color"], w["shape"]) for w in wanted)
        have = Counter(key(o.color, o.shape) for o in objects)
        return all(have[value] >= n for value, n in need.items())

    return {"color": covered(lambda c, s: c), "shape": covered(lambda c, s: s),
            "color_shape": covered(lambda c, s: (c, s))}


def _agreement(wanted: dict, detected: Detected) -> int:
    return (wanted["color"] == detected.color) + (wanted["shape"] == detected.shape)


def _relation_holds(spec: dict, objects: list[Detected], canvas: int) -> bool:
    subject_spec, reference_spec = spec["objects"]
    candidates = [(_agreement(subject_spec, a) + _agreement(reference_spec, b), a.area + b.area, i, j)
                  for i, a in enumerate(objects) for j, b in enumerate(objects) if i != j
                  and _agreement(subject_spec, a) > 0 and _agreement(reference_spec, b) > 0]
    if not candidates:
        return False
    *_, i, j = max(candidates)
    return relation_holds(spec["relation"], objects[i].centre, objects[j].centre, canvas)


def relation_holds(relation: str, subject: tuple[float, float], reference: tuple[float, float],
                   canvas: int) -> bool:
    """Whether centre `subject` is `relation` centre `reference` (see the module docstring)."""
    dx, dy = reference[0] - subject[0], reference[1] - subject[1]  # > 0: subject left of / above
    along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    margin = RELATION_MARGIN * SIZE_PX_AT_64["small"] * canvas / 64
    return along >= margin and along > abs(across)
