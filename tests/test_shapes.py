"""The procedural shapes data set follows shared/SHAPES.md: captions, geometry, colours, held-out
pairs, determinism, the dataset wrapper and the on-disk writer."""
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_proto.datasets.shapes import (
    COLORS, HELD_OUT_EVAL_EVERY, HELD_OUT_PAIRS, NUMBERS, POSITIONS, RELATIONS, SHAPES,
    ShapesDataset, render_caption, render_scene, sample_scene, write_shapes)
from dalle_proto.datasets.shapes_grammar import PREFIXES, article, compose_caption, parse_caption
from dalle_proto.datasets.shapes_render import blend_lut, shape_coverage

REPO = Path(__file__).resolve().parents[1]
N_SCENES = 2000


@pytest.fixture(scope="module", params=["train", "eval"])
def sampled(request):
    split = request.param
    return split, [sample_scene(7, i, 64, split) for i in range(N_SCENES)]


# ------------------------------------------------------------------ captions vs ground truth

def assert_caption_matches_truth(caption: str, truth: dict) -> None:
    spec = parse_caption(caption)
    assert compose_caption(spec) == caption
    assert spec["type"] == truth["type"]
    assert spec["relation"] == truth["relation"]
    assert spec["number"] == truth["number"]
    stated = [(o["color"], o["shape"]) for o in spec["objects"]]
    actual = [(o["color"], o["shape"]) for o in truth["objects"]]
    if truth["type"] == "count":
        assert len(actual) == truth["number"] and set(actual) == set(stated) and len(stated) == 1
    else:
        assert stated == actual
    if truth["type"] == "single":
        said, obj = spec["objects"][0], truth["objects"][0]
        if said["size"] is not None:
            assert said["size"] == obj["size"]
        if said["position"] is not None:
            assert said["position"] == obj["position"]
            assert tuple(obj["cell"]) == POSITIONS[said["position"]]
    else:
        assert all(o["size"] is None and o["position"] is None for o in spec["objects"])
    assert truth["held_out"] == any(pair in HELD_OUT_PAIRS for pair in actual)


def test_every_caption_parses_back_to_its_ground_truth(sampled):
    _, scenes = sampled
    for caption, truth in scenes:
        assert_caption_matches_truth(caption, truth)
        json.dumps(truth)  # JSON-serialisable


def test_mix_prefixes_and_stated_attributes_follow_the_spec(sampled):
    _, scenes = sampled
    types = Counter(truth["type"] for _, truth in scenes)
    for kind, share in (("single", 0.50), ("pair", 0.35), ("count", 0.15)):
        assert abs(types[kind] / N_SCENES - share) < 0.04, types
    specs = [parse_caption(caption) for caption, _ in scenes]
    prefixes = Counter(spec["prefix"] for spec in specs)
    assert set(prefixes) == set(PREFIXES) and min(prefixes.values()) > N_SCENES / 4 * 0.8
    singles = [spec["objects"][0] for spec in specs if spec["type"] == "single"]
    for attribute in ("size", "position"):
        share = sum(o[attribute] is not None for o in singles) / len(singles)
        assert 0.44 < share < 0.56
    assert {spec["relation"] for spec in specs} == set(RELATIONS) | {None}
    assert {spec["number"] for spec in specs} - {None} == set(NUMBERS.values())


# ------------------------------------------------------------------ geometry

def assert_geometry(truth: dict, size: int) -> None:
    f = size / 64
    side = {"small": round(16 * f), "large": round(28 * f)}
    for obj in truth["objects"]:
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size, obj
        assert x1 - x0 == y1 - y0 == side[obj["size"]], obj
        for centre, cell in zip(((x0 + x1) / 2, (y0 + y1) / 2), obj["cell"]):
            distances = [abs(centre - (k + 1) * size / 4) for k in range(3)]
            assert distances[cell] == min(distances), obj  # the cell of the nearest grid centre
        assert POSITIONS[obj["position"]] == tuple(obj["cell"])
    if truth["type"] == "single":
        (obj,) = truth["objects"]
        centre = np.array([(obj["box"][0] + obj["box"][2]) / 2, (obj["box"][1] + obj["box"][3]) / 2])
        grid = np.array([(c + 1) * size / 4 for c in POSITIONS[obj["position"]]])
        assert np.abs(centre - grid).max() <= 2 * f + 0.5, obj  # jitter (+ rounding of odd sides)
    elif truth["type"] == "pair":
        a, b = truth["objects"]
        assert a["size"] == b["size"] == "small"
        assert (a["color"], a["shape"]) != (b["color"], b["shape"])
        axis = 0 if truth["relation"] in ("to the left of", "to the right of") else 1
        first, second = (a, b) if truth["relation"] in ("to the left of", "above") else (b, a)
        assert first["box"][axis + 2] <= second["box"][axis], truth  # no overlap along the axis
        across = 1 - axis
        offset = abs((a["box"][across] + a["box"][across + 2]) - (b["box"][across] + b["box"][across + 2])) / 2
        assert offset <= 8 * f, truth
    else:
        objects = truth["objects"]
        assert len(objects) == truth["number"] and {o["size"] for o in objects} == {"small"}
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                p, q = a["box"], b["box"]
                assert max(q[0] - p[2], p[0] - q[2], q[1] - p[3], p[1] - q[3]) >= 2 * f, truth


def test_geometry_constraints_hold(sampled):
    _, scenes = sampled
    for _, truth in scenes:
        assert_geometry(truth, 64)


def test_larger_canvas_scales_the_geometry():
    for i in range(300):
        caption, truth = sample_scene(3, i, 128, "eval")
        assert_geometry(truth, 128)
        assert_caption_matches_truth(caption, truth)
    scene = render_scene(3, 0, size=128)
    assert scene.image.size == (128, 128) and scene.image.mode == "RGB"
    big = render_caption("a large blue square in the center", size=128)
    x0, y0, x1, y1 = big.truth["objects"][0]["box"]
    assert x1 - x0 == 56
    pixels = np.asarray(big.image)
    assert (pixels[y0:y1, x0:x1] == COLORS["blue"]).all()


# ------------------------------------------------------------------ pixels

def test_pixels_are_flat_colours_blended_with_white_and_white_outside_boxes():
    for i in range(200):
        scene = render_scene(11, i, split="eval")
        pixels = np.asarray(scene.image).astype(int)  # (64, 64, 3)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene.truth["objects"]:
            x0, y0, x1, y1 = obj["box"]
            outside[y0:y1, x0:x1] = False
            inside = pixels[y0:y1, x0:x1].reshape(-1, 3)
            allowed = {tuple(v) for v in blend_lut(obj["color"]).tolist()}
            assert {tuple(v) for v in inside.tolist()} <= allowed
            assert tuple(COLORS[obj["color"]]) in {tuple(v) for v in inside.tolist()}
        assert (pixels[outside] == 255).all()


@pytest.mark.parametrize("color", list(COLORS))
def test_centre_of_large_square_and_circle_has_the_table_colour(color):
    for shape in ("square", "circle"):
        scene = render_caption(f"a large {color} {shape} in the center", seed=1)
        x0, y0, x1, y1 = scene.truth["objects"][0]["box"]
        assert scene.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLORS[color]
        assert scene.image.getpixel((0, 0)) == (255, 255, 255)


def test_shape_coverage_follows_the_shape_table():
    b = 28
    cov = {shape: shape_coverage(shape, b).astype(int) for shape in SHAPES}
    full, mid, last = 16, b // 2, b - 1
    assert (cov["square"] == full).all()
    for shape in SHAPES:
        assert cov[shape][mid, mid] == full, shape  # every shape covers its centre
        assert (cov[shape] == cov[shape][:, ::-1]).all(), shape  # left-right symmetric
    for shape in ("circle", "triangle", "diamond", "cross", "star"):
        assert cov[shape][0, 0] == 0, shape  # top-left corner empty
    assert cov["circle"][0, mid] > 0 and cov["circle"][mid, 0] > 0
    assert cov["triangle"][last, 0] > 0 and cov["triangle"][last, mid] == full
    assert cov["triangle"][0, mid] > 0 and cov["triangle"][mid, 1] == 0
    assert cov["diamond"][last, 0] == 0 and cov["diamond"][0, mid] > 0 and cov["diamond"][mid, 0] > 0
    assert cov["cross"][0, mid] == full and cov["cross"][mid, 0] == full and cov["cross"][last, last] == 0
    assert cov["star"][1, mid] > 0  # the point straight up
    assert cov["star"][round(0.9 * b), mid] == 0  # the notch between the two lower points
    # the upper-left point sits at angle 198 degrees: (0.5 - 0.476, 0.5 - 0.155) of the box
    # (0.69 px, 9.66 px) at b = 28: column 0 stays empty, column 1 is touched only there
    assert (cov["star"][:, 0] == 0).all()
    assert set(np.flatnonzero(cov["star"][:, 1])) <= {9, 10} and cov["star"][:, 1].max() > 0
    assert cov["circle"].sum() / (full * b * b) == pytest.approx(np.pi / 4, abs=0.01)
    assert cov["cross"].sum() / (full * b * b) == pytest.approx(5 / 9, abs=0.02)


# ------------------------------------------------------------------ held-out pairs

def test_held_out_pairs_never_in_train_and_forced_in_eval():
    held_out_phrases = [f"{c} {s}" for c, s in HELD_OUT_PAIRS]  # also matches "purple circles"
    for i in range(5000):
        caption, truth = sample_scene(0, i, 64, "train")
        assert not truth["held_out"]
        assert not any((o["color"], o["shape"]) in HELD_OUT_PAIRS for o in truth["objects"])
        assert not any(p in caption for p in held_out_phrases), caption
    seen = Counter()
    for i in range(600):
        caption, truth = sample_scene(0, i, 64, "eval")
        if i % HELD_OUT_EVAL_EVERY == 0:
            assert truth["held_out"], (i, caption)
        seen[truth["type"]] += truth["held_out"]
        for o in truth["objects"]:
            seen[(o["color"], o["shape"])] += 1
    assert all(seen[pair] > 0 for pair in HELD_OUT_PAIRS)
    assert all(seen[kind] > 0 for kind in ("single", "pair", "count"))


# ------------------------------------------------------------------ determinism

def _digest(seed: int, indices, split: str) -> str:
    h = hashlib.sha256()
    for i in indices:
        scene = render_scene(seed, i, 64, split)
        h.update(np.asarray(scene.image).tobytes())
        h.update(scene.caption.encode())
        h.update(json.dumps(scene.truth, sort_keys=True).encode())
    return h.hexdigest()


def test_scene_is_a_pure_function_of_seed_index_split():
    a, b = render_scene(5, 17, split="eval"), render_scene(5, 17, split="eval")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.caption, a.truth) == (b.caption, b.truth)
    others = [render_scene(6, 17, split="eval"), render_scene(5, 18, split="eval"), render_scene(5, 17)]
    assert all(o.caption != a.caption or o.truth["objects"] != a.truth["objects"] for o in others)
    code = ("from tests.test_shapes import _digest; "
            "print(_digest(2, range(40), 'train'), _digest(2, range(40), 'eval'))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [_digest(2, range(40), "train"), _digest(2, range(40), "eval")]


# ------------------------------------------------------------------ grammar

def test_a_an_rule_and_plural_crosses(sampled):
    _, scenes = sampled
    for caption, _ in scenes:
        words = caption.split(" ")
        for word, following in zip(words, words[1:]):
            if word in ("a", "an"):
                assert word == article(following), caption
    assert render_caption("an orange star").caption == "an orange star"
    assert parse_caption("an image of an orange star")["prefix"] == "an image of "
    count = parse_caption("three yellow crosses")
    assert count["objects"][0]["shape"] == "cross" and count["number"] == 3
    crosses = [c for c, t in scenes if t["type"] == "count" and t["objects"][0]["shape"] == "cross"]
    assert crosses and all(c.endswith(" crosses") for c in crosses)
    assert compose_caption({"type": "count", "prefix": "", "objects": [
        {"color": "red", "shape": "cross", "size": None, "position": None}],
        "relation": None, "number": 2}) == "two red crosses"


@pytest.mark.parametrize("bad", [
    "a orange star", "an red circle", "a image of a red circle", "A red circle", "a red circle.",
    "a  red circle", "a red blob", "a red circle to the left of an blue square", "three red crosss",
    "two red circle", "a large red circle to the left of a blue square", "five red circles", "",
])
def test_parse_rejects_captions_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="caption") as error:
        parse_caption(bad)
    assert repr(bad) in str(error.value)


def test_render_caption_matches_any_grammatical_caption():
    for caption in ["a purple circle", "a small green star at the bottom", "an image of a large yellow cross",
                    "a red diamond below an orange square", "four cyan triangles",
                    "a drawing of a blue star to the right of a blue circle"]:
        scene = render_caption(caption, seed=3)
        assert scene.caption == caption
        assert_caption_matches_truth(caption, scene.truth)
        assert_geometry(scene.truth, 64)
        again = render_caption(caption, seed=3)
        assert np.array_equal(np.asarray(scene.image), np.asarray(again.image))


# ------------------------------------------------------------------ dataset and writer

def test_dataset_yields_images_and_captions():
    data = ShapesDataset(5, seed=4, split="eval")
    assert len(data) == 5
    image, caption = data[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert caption == render_scene(4, 2, split="eval").caption == data.scene(2).caption
    assert data.captions(2) == [caption] and data.captions(-1) == [data[4][1]]
    with pytest.raises(IndexError):
        data[5]
    as_array, _ = ShapesDataset(2, transform=np.asarray)[1]
    assert as_array.shape == (64, 64, 3)
    assert len(list(iter(data))) == 5
    with pytest.raises(ValueError, match="split 'test'"):
        ShapesDataset(3, split="test")


def test_write_shapes_writes_triplets_that_match_render_scene(tmp_path):
    out = write_shapes(tmp_path / "shapes", 4, seed=9, size=64, split="eval", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{i:06d}.{ext}" for i in range(4) for ext in ("png", "txt", "json"))
    for i in range(4):
        scene = render_scene(9, i, 64, "eval")
        with Image.open(out / f"{i:06d}.png") as image:
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.asarray(scene.image))
        assert (out / f"{i:06d}.txt").read_text() == scene.caption + "\n"
        assert json.loads((out / f"{i:06d}.json").read_text()) == scene.truth


# ------------------------------------------------------------------ a training mix other than SHAPES.md's

def test_shapes_mix_sets_scene_type_shares_and_keeps_the_default_exact():
    for i in range(200):  # SHAPES.md's own percentages give the very same scenes as no mix
        assert sample_scene(5, i, 64, "train", [50, 35, 15]) == sample_scene(5, i, 64, "train")
    types = Counter(sample_scene(5, i, 64, "train", {"single": 20, "pair": 60, "count": 20})[1]["type"]
                    for i in range(N_SCENES))
    assert abs(types["pair"] / N_SCENES - 0.60) < 0.04 and abs(types["single"] / N_SCENES - 0.20) < 0.03
    only_pairs = ShapesDataset(50, seed=5, mix=[0, 100, 0])
    for i in range(50):
        caption, truth = sample_scene(5, i, 64, "train", [0, 100, 0])
        assert truth["type"] == "pair" and only_pairs[i][1] == caption == only_pairs.captions(i)[0]
        assert_caption_matches_truth(caption, truth)


@pytest.mark.parametrize("mix", [[50, 35, 10], [50, 50], [-10, 60, 50], [50.5, 34.5, 15],
                                 {"pair": 35, "single": 50, "count": 15}])
def test_shapes_mix_rejects_anything_but_three_whole_percentages(mix):
    with pytest.raises(ValueError, match="shapes mix"):
        sample_scene(0, 0, 64, "train", mix)


def test_data_config_shapes_mix_applies_to_the_train_split_of_shapes_only():
    from dalle_proto.datasets import DataConfig, build_dataset

    data = DataConfig(kind="shapes", train_count=40, eval_count=8, shapes_mix=[0, 0, 100])
    assert {build_dataset(data, "train").scene(i).truth["type"] for i in range(40)} == {"count"}
    assert build_dataset(data, "eval").mix is None  # validation keeps SHAPES.md's mix
    with pytest.raises(ValueError, match="shapes_mix applies to data.kind='shapes' only"):
        DataConfig(kind="folder", path="x", shapes_mix=[0, 0, 100])
    with pytest.raises(ValueError, match="summing to 100"):
        DataConfig(shapes_mix=[10, 10, 10])
