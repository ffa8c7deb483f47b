"""benchmarks/binding_probes.py: token labels follow the rendered pixels, perturbed captions change what
they say they change, and the densely recomputed attention reproduces the model's own forward."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle_proto.datasets.shapes import render_caption
from dalle_proto.datasets.shapes_grammar import parse_caption
from dalle_proto.transformer import DalleTransformer, TransformerConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "binding_probes.py"
spec = importlib.util.spec_from_file_location("binding_probes", SCRIPT)
probes = importlib.util.module_from_spec(spec)
sys.modules["binding_probes"] = probes
spec.loader.exec_module(probes)


def test_token_labels_of_a_pair_follow_its_pixels():
    scene = render_caption("a red circle above a blue square", seed=4)
    labels = probes.token_labels(scene, grid=16)
    owner, ink, start = labels["owner"], labels["ink"], labels["start"]  # (256,) each
    assert set(np.unique(owner)) == {-1, 0, 1}
    assert not (ink & (owner < 0)).any()
    for k in (0, 1):
        mine = np.flatnonzero((owner == k) & ink)
        assert np.flatnonzero(start & (owner == k)).tolist() == [mine[0]]  # one start: the first ink token
    # "above": the subject (caption order 0) is the upper object, so it is drawn first in raster order
    assert labels["rank"][:2].tolist() == [0, 1]
    assert not (labels["near"] & (owner >= 0)).any()


def test_perturbed_captions():
    rng = np.random.default_rng(0)
    swapped = probes.perturbed("a red circle to the left of a blue square", "swap_colors", rng)
    assert swapped == "a blue circle to the left of a red square"
    new = parse_caption(probes.perturbed("a red circle to the left of a blue square", "new_color_2", rng))
    assert new["objects"][0]["color"] == "red" and new["objects"][1]["color"] not in ("red", "blue")
    assert parse_caption(probes.perturbed("three red circles", "new_number", rng))["number"] != 3
    # the relation's direction: its opposite word, or the objects named the other way round
    assert probes.perturbed("a red circle below a blue square", "flip_relation", rng) == "a red circle above a blue square"
    assert probes.perturbed("an orange star to the left of a blue square", "reverse_order", rng) == \
        "a blue square to the left of an orange star"
    # equal colours: exchanging them changes nothing, so there is no perturbed caption
    assert probes.perturbed("a red circle above a red square", "swap_colors", rng) is None


@pytest.mark.parametrize("attention, text_attention, code_pixels", [
    ("sparse", "causal", 0), ("sparse", "bidirectional", 0), ("full", "causal", 0), ("full", "bidirectional", 0),
    ("sparse", "bidirectional", 12)])  # the pixel terms of embedding and head go through the probe too
def test_recomputed_attention_matches_the_model(attention, text_attention, code_pixels):
    torch.manual_seed(0)
    config = TransformerConfig.from_size("tiny", attention=attention, text_attention=text_attention,
                                         text_loss_weight=0.0 if text_attention == "bidirectional" else 1 / 8,
                                         code_pixels=code_pixels)
    model = DalleTransformer(config).eval()
    if code_pixels:
        model.set_code_pixels(torch.rand(config.image_vocab_size, code_pixels) * 2 - 1)
    text = torch.randint(0, config.text_vocab_size, (2, config.text_len))
    image = torch.randint(0, config.image_vocab_size, (2, config.image_len))
    logits, text_probs, diffs = probes.forward_with_attention(model, text, image, verify=True)
    _, reference = model(text, image)
    assert torch.allclose(logits, reference, atol=1e-5)
    assert max(diffs) < 1e-5
    assert len(text_probs) == config.depth
    assert text_probs[0].shape == (2, config.heads, config.image_len, config.text_len)
    # each image query's weight on the caption is a share of a softmax: within [0, 1], and the first
    # image query (the last text position) puts all of it on the caption
    mass = text_probs[0].sum(-1)
    assert (mass <= 1 + 1e-5).all() and torch.allclose(mass[:, :, 0], torch.ones(2, config.heads))
