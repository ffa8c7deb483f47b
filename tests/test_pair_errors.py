"""benchmarks/pair_errors.py sorts a pair image by its detected objects into one kind of error."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dalle_proto.datasets.shapes import render_caption
from dalle_proto.shapes_detection import detect_objects

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pair_errors.py"
spec = importlib.util.spec_from_file_location("pair_errors", SCRIPT)
pair_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pair_errors)

CAPTION = "a red circle to the left of a blue square"


@pytest.mark.parametrize("drawn, kind", [
    (CAPTION, "both right"),
    ("a blue square to the right of a red circle", "both right"),  # the relation is not checked
    ("a red square to the left of a blue circle", "exchanged"),
    ("a red circle to the left of a red square", "colour copied"),
    ("a red circle to the left of a blue circle", "shape copied"),
    ("a green circle to the left of a blue square", "other"),
    ("a red circle", "objects != 2"),
    ("three red circles", "objects != 2"),
])
def test_renders_of_other_captions_are_sorted_into_their_kind(drawn, kind):
    objects = detect_objects(render_caption(drawn, seed=3).image)
    assert pair_errors.classify(CAPTION, objects) == kind
