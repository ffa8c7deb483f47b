"""The analytic shapes evaluator reads the data set's own renders (clean, JPEG, blurred, 128 px,
slightly off colours, noise, specks) as correct and rejects captions with one attribute changed.

`python3 tests/test_shapes_evaluator.py` prints the measured accuracies and speed."""
import io
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dalle_proto.datasets.shapes import render_scene
from dalle_proto.datasets.shapes_grammar import (
    COLORS, NUMBERS, POSITIONS, RELATIONS, SHAPES, compose_caption, parse_caption)
from dalle_proto.shapes_detection import detect_objects, detect_objects_batch
from dalle_proto.shapes_evaluator import (
    ATTRIBUTES, evaluate, evaluate_batch, evaluate_each, evaluate_objects, relation_holds, summarize)

SEED = 3
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}


# ------------------------------------------------------------------ conditions

def jpeg(image: Image.Image, quality: int = 50) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(1))


def imperfect(image: Image.Image, index: int) -> Image.Image:
    """What a generative model gets slightly wrong: colours off by up to 25 per channel, pixel
    noise, a light background tint, a few stray pixels."""
    rng = np.random.default_rng(index)
    pixels = np.asarray(image).astype(np.float32)  # (H, W, 3)
    ink = (255 - pixels.min(axis=2, keepdims=True)) / 255  # ~1 on objects, 0 on background
    pixels += ink * rng.uniform(-25, 25, size=3)  # a colour shift of the objects
    pixels += rng.normal(0, 6, size=pixels.shape) - 4  # noise and a grey tint
    h, w, _ = pixels.shape
    for _ in range(4):  # isolated stray pixels of random colours
        pixels[rng.integers(h), rng.integers(w)] = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def scenes(count: int, size: int = 64, start: int = 0):
    return [render_scene(SEED, i, size, "eval") for i in range(start, start + count)]


# ------------------------------------------------------------------ wrong captions

def wrong_captions(caption: str, rng: random.Random) -> dict[str, str]:
    """One caption per changed attribute (those the caption states), each false of its image."""
    spec = parse_caption(caption)
    wrong = {}

    def changed(edit) -> str:
        new = {**spec, "objects": [dict(o) for o in spec["objects"]]}
        edit(new, rng.randrange(len(new["objects"])))
        return compose_caption(new)

    def other(values, current):
        return rng.choice([v for v in values if v != current])

    wrong["color"] = changed(lambda s, i: s["objects"][i].update(color=other(tuple(COLORS), s["objects"][i]["color"])))
    wrong["shape"] = changed(lambda s, i: s["objects"][i].update(shape=other(SHAPES, s["objects"][i]["shape"])))
    if spec["type"] == "pair":
        wrong["relation"] = changed(lambda s, i: s.update(relation=OPPOSITE[s["relation"]]))
    if spec["type"] == "count":
        wrong["count"] = changed(lambda s, i: s.update(number=other(tuple(NUMBERS.values()), s["number"])))
    if spec["type"] == "single" and spec["objects"][0]["size"]:
        wrong["size"] = changed(lambda s, i: s["objects"][0].update(
            size="small" if s["objects"][0]["size"] == "large" else "large"))
    if spec["type"] == "single" and spec["objects"][0]["position"]:
        wrong["position"] = changed(lambda s, i: s["objects"][0].update(
            position=other(tuple(POSITIONS), s["objects"][0]["position"])))
    return wrong


def rejection_rates(images, captions, size: int) -> dict[str, float]:
    """Share of wrong captions (per changed attribute) that the evaluator calls incorrect."""
    rng = random.Random(SEED)
    tried, rejected = {}, {}
    for objects, caption in zip(detect_objects_batch(images), captions):
        for attribute, wrong in wrong_captions(caption, rng).items():
            tried[attribute] = tried.get(attribute, 0) + 1
            rejected[attribute] = rejected.get(attribute, 0) + (not evaluate_objects(objects, wrong, size).correct)
    return {a: rejected[a] / tried[a] for a in tried}


def worst(summary: dict) -> float:
    return min([summary["overall"], *summary["attributes"].values()])


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def clean64():
    return scenes(2000)


@pytest.fixture(scope="module")
def clean_summary(clean64):
    return evaluate_batch([s.image for s in clean64], [s.caption for s in clean64])


# ------------------------------------------------------------------ the data set's renders read as correct

def test_clean_renders_score_at_least_99_5_percent_on_every_attribute(clean_summary):
    assert clean_summary["n"] == 2000
    assert set(clean_summary["attributes"]) == set(ATTRIBUTES)  # every attribute was scored
    assert worst(clean_summary) >= 0.995, clean_summary
    for kind in ("single", "pair", "count"):
        assert clean_summary["by_type"][kind]["n"] > 100
        assert worst(clean_summary["by_type"][kind]) >= 0.995, (kind, clean_summary["by_type"][kind])
    assert clean_summary["held_out"]["n"] >= 2000 // 6 and worst(clean_summary["held_out"]) >= 0.995


def test_summary_counts_only_the_attributes_a_caption_states(clean_summary, clean64):
    counts = clean_summary["counts"]
    kinds = [s.truth["type"] for s in clean64]
    assert counts["color"] == counts["shape"] == counts["color_shape"] == 2000
    assert counts["relation"] == kinds.count("pair")
    assert counts["count"] == kinds.count("count")
    assert counts["size"] == sum(parse_caption(s.caption)["objects"][0]["size"] is not None
                                 for s in clean64 if s.truth["type"] == "single")
    assert clean_summary["by_type"]["pair"]["counts"].keys() == {"color", "shape", "color_shape", "relation"}


@pytest.mark.parametrize("condition", [jpeg, blur])
def test_jpeg_50_and_blur_1_renders_score_at_least_97_percent(condition):
    batch = scenes(1000, start=5000)
    summary = evaluate_batch([condition(s.image) for s in batch], [s.caption for s in batch])
    assert worst(summary) >= 0.97, (condition.__name__, summary)


def test_slightly_wrong_colours_noise_and_stray_pixels_still_read_correctly():
    batch = scenes(600, start=9000)
    summary = evaluate_batch([imperfect(s.image, i) for i, s in enumerate(batch)], [s.caption for s in batch])
    assert worst(summary) >= 0.97, summary


@pytest.mark.parametrize("condition", [None, jpeg])
def test_128_px_renders_score_like_64_px(condition):
    batch = scenes(300, size=128, start=20000)
    images = [s.image if condition is None else condition(s.image) for s in batch]
    summary = evaluate_batch(images, [s.caption for s in batch])
    assert worst(summary) >= (0.995 if condition is None else 0.97), summary
    assert rejection_rates(images, [s.caption for s in batch], 128)["color"] >= 0.99


# ------------------------------------------------------------------ wrong captions are rejected

def test_wrong_captions_are_rejected_at_least_99_percent_of_the_time(clean64):
    rates = rejection_rates([s.image for s in clean64], [s.caption for s in clean64], 64)
    assert rates.keys() == {"color", "shape", "relation", "count", "size", "position"}
    assert min(rates.values()) >= 0.99, rates


def test_wrong_captions_are_rejected_on_jpeg_renders_too():
    batch = scenes(600, start=30000)
    rates = rejection_rates([jpeg(s.image) for s in batch], [s.caption for s in batch], 64)
    assert min(rates.values()) >= 0.99, rates


def test_an_extra_object_or_a_missing_one_makes_a_caption_incorrect():
    a = render_scene(SEED, 0, 64, "eval")
    single = next(s for s in scenes(50) if s.truth["type"] == "single")
    assert evaluate(single.image, single.caption).correct
    pixels = np.asarray(single.image).copy()
    box = single.truth["objects"][0]["box"]
    spot = (2, 2) if box[0] > 20 or box[1] > 20 else (52, 52)  # a corner the object leaves free
    pixels[spot[1]:spot[1] + 8, spot[0]:spot[0] + 8] = (30, 30, 30)  # an 8x8 black square
    result = evaluate(Image.fromarray(pixels), single.caption)
    assert not result.correct and len(result.objects) == 2
    assert result.attributes["color_shape"]  # the stated object is still there
    blank = Image.new("RGB", (64, 64), "white")
    result = evaluate(blank, a.caption)
    assert result.objects == [] and not result.correct and not any(result.attributes.values())


def test_a_pair_needs_two_objects_even_when_both_are_alike():
    pair = next(s for s in scenes(50) if s.truth["type"] == "pair")
    subject, reference = pair.truth["objects"]
    same = {**parse_caption(pair.caption), "objects": [
        {"color": subject["color"], "shape": subject["shape"], "size": None, "position": None}] * 2}
    result = evaluate(pair.image, compose_caption(same))
    assert not result.correct and not result.attributes["color_shape"]


# ------------------------------------------------------------------ detection and geometry

def test_detected_objects_match_the_ground_truth_of_clean_renders(clean64):
    for scene, objects in zip(clean64[:300], detect_objects_batch([s.image for s in clean64[:300]])):
        truth = sorted(scene.truth["objects"], key=lambda o: o["box"])
        found = sorted(objects, key=lambda o: o.box)
        assert len(found) == len(truth), scene.caption
        for t, d in zip(truth, found):
            assert (d.color, d.shape, d.size) == (t["color"], t["shape"], t["size"]), scene.caption
            assert np.allclose(d.box, t["box"], atol=0.5), (d.box, t["box"])
            assert d.shape_score > 0.9


def test_size_argument_reports_geometry_on_that_canvas():
    scene = render_scene(SEED, 1, 64, "eval")
    big = scene.image.resize((256, 256), Image.NEAREST)
    small_canvas = detect_objects(big, size=64)
    native = detect_objects(scene.image)
    assert [(o.color, o.shape, o.size, o.cell) for o in small_canvas] == \
           [(o.color, o.shape, o.size, o.cell) for o in native]
    assert np.allclose([o.box for o in small_canvas], [o.box for o in native], atol=0.5)
    assert evaluate(big, scene.caption, size=64).correct


def test_relation_rule_uses_centres_with_a_half_box_margin():
    assert relation_holds("to the left of", (10, 30), (30, 34), 64)
    assert relation_holds("to the right of", (30, 34), (10, 30), 64)
    assert not relation_holds("to the left of", (10, 30), (17, 30), 64)  # 7 px < 8 px margin
    assert not relation_holds("to the left of", (10, 10), (30, 40), 64)  # more below than right
    assert relation_holds("above", (30, 10), (35, 40), 64)
    assert relation_holds("below", (30, 40), (35, 10), 64)
    assert relation_holds("to the left of", (20, 60), (52, 60), 128)  # 16 px margin at S = 128
    assert not relation_holds("to the left of", (20, 60), (35, 60), 128)


# ------------------------------------------------------------------ inputs and errors

def test_pil_uint8_and_float_tensor_inputs_agree():
    batch = scenes(8)
    pil = evaluate_each([s.image for s in batch], [s.caption for s in batch])
    arrays = np.stack([np.asarray(s.image) for s in batch])  # (B, H, W, 3) uint8
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
    for other in (evaluate_each(arrays, [s.caption for s in batch]),
                  evaluate_each(tensors, [s.caption for s in batch])):
        assert [(r.correct, r.attributes) for r in other] == [(r.correct, r.attributes) for r in pil]
    single = evaluate(tensors[0], batch[0].caption)
    assert (single.correct, single.attributes) == (pil[0].correct, pil[0].attributes)
    assert summarize(pil)["n"] == 8


def test_bad_inputs_raise_clear_errors():
    image = render_scene(SEED, 0, 64, "eval").image
    with pytest.raises(ValueError, match="a red ball"):
        evaluate(image, "a red ball")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        evaluate_batch([image, image], ["a red circle"])
    with pytest.raises(ValueError, match="square"):
        detect_objects(Image.new("RGB", (64, 32), "white"))
    with pytest.raises(ValueError, match="float shapes images"):
        detect_objects(np.zeros((64, 64, 3), dtype=np.float32))


if __name__ == "__main__":  # measured accuracies and speed, printed
    conditions = {"clean": lambda im, i: im, "jpeg50": lambda im, i: jpeg(im), "blur1": lambda im, i: blur(im),
                  "imperfect": imperfect}
    for size, count in ((64, 3000), (128, 1000)):
        base = scenes(count, size=size, start=100000)
        captions = [s.caption for s in base]
        for name, condition in conditions.items():
            images = [condition(s.image, i) for i, s in enumerate(base)]
            start = time.perf_counter()
            summary = evaluate_batch(images, captions)
            seconds = time.perf_counter() - start
            rates = rejection_rates(images, captions, size)
            print(f"S={size} {name:9s} n={count} overall={summary['overall']:.4f} " +
                  " ".join(f"{a}={v:.4f}" for a, v in summary["attributes"].items()) +
                  f" | by type " + " ".join(f"{k}={v['overall']:.4f}" for k, v in summary["by_type"].items()) +
                  f" | reject " + " ".join(f"{a}={v:.4f}" for a, v in sorted(rates.items())) +
                  f" | {count / seconds:.0f} images/s")
