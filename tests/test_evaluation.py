"""`dalle-proto evaluate`: the prompt set, the statistics, and a full evaluation of ground-truth renders."""
import json

import pytest
import torch

from dalle_proto.clip import ClipConfig, ClipModel
from dalle_proto.datasets.shapes import render_caption
from dalle_proto.datasets.shapes_grammar import is_held_out, parse_caption
from dalle_proto.evaluation import (CATEGORIES, clip_r_precision, evaluate_pipeline, frechet_distance,
                                    position_entropy, prompt_set, without_prefix)
from dalle_proto.pipeline import PipelineConfig
from dalle_proto.text_tokenizer import TextTokenizer, TextTokenizerConfig

SIZE = 32


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    torch.manual_seed(0)
    features = torch.randn(2000, 8)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2000, 8)  # same distribution, other draw: small
    shifted = [frechet_distance(features, other + shift) for shift in (0.0, 0.5, 1.0)]
    assert shifted[0] < 0.1 < shifted[1] < shifted[2]
    assert shifted[2] == pytest.approx(8 * 1.0 ** 2, rel=0.1)  # |mu shift|^2 dominates
    scaled = frechet_distance(features, 2 * other)  # same mean, covariance 4 I: tr(I + 4I - 2*2I) = D
    assert scaled == pytest.approx(8.0, rel=0.1)


def test_position_entropy_is_one_for_uniform_cells_and_zero_for_one_cell():
    cells = [(c, r) for c in range(3) for r in range(3)] * 5
    assert position_entropy(cells) == pytest.approx(1.0)
    assert position_entropy([(1, 1)] * 10) == pytest.approx(0.0)


class IndexTokenizer:
    """Captions -> (M, 1) ids: the caption's index in a fixed list."""

    def __init__(self, captions):
        self.index = {c: i for i, c in enumerate(captions)}

    def eval(self):
        return self

    def encode(self, captions):
        return torch.tensor([[self.index[c]] for c in captions])


class OracleClip(torch.nn.Module):
    """Images are (3, 1, 1) tensors carrying their caption index; perfect, or random embeddings."""

    def __init__(self, size: int, perfect: bool):
        super().__init__()
        self.size, self.perfect = size, perfect
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.random = torch.nn.functional.normalize(torch.randn(10000, 16, generator=torch.Generator().manual_seed(0)), dim=-1)

    def encode_text(self, ids):
        if self.perfect:
            return torch.nn.functional.one_hot(ids[:, 0], self.size).float()
        return self.random[ids[:, 0]]

    def encode_image(self, images):
        index = images[:, 0, 0, 0].long()
        if self.perfect:
            return torch.nn.functional.one_hot(index, self.size).float()
        return self.random[5000 + torch.arange(len(images))]


def test_r_precision_is_one_for_a_perfect_scorer_and_chance_for_a_random_one():
    captions = [f"caption {i}" for i in range(300)]
    tokenizer = IndexTokenizer(captions)
    images = torch.arange(300).float().view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
    assert clip_r_precision(OracleClip(300, True), tokenizer, images, captions) == 1.0
    random = clip_r_precision(OracleClip(300, False), tokenizer, images, captions)
    assert random < 0.05  # chance is 1 / 100


def test_prompt_set_is_seeded_and_keeps_held_out_pairs_in_their_category():
    prompts = prompt_set(per_category=30, seed=0)
    assert prompts == prompt_set(per_category=30, seed=0)
    assert prompts != prompt_set(per_category=30, seed=1)
    for category in CATEGORIES:
        assert sum(p.category == category for p in prompts) >= 30
    for p in prompts:
        spec = parse_caption(p.caption)
        names_held_out = any(is_held_out(o["color"], o["shape"]) for o in spec["objects"])
        assert names_held_out == (p.category == "held_out"), p
        if p.category != "held_out":
            assert spec["type"] == p.category
    assert without_prefix("a picture of a red circle") == "a red circle"


class GroundTruthPipeline:
    """Stands in for DallePipeline: returns the ground-truth render of every prompt."""

    def __init__(self, text_tokenizer, clip=None):
        self.text_tokenizer, self.clip = text_tokenizer, clip
        self.calls, self.prompts = [], []

    def __call__(self, prompts, num_images=1, seed=0, rerank=None, **options):
        self.calls.append((len(prompts), seed, rerank))
        self.prompts += list(prompts)
        return [render_caption(p, seed=seed, size=SIZE).image for p in prompts for _ in range(num_images)]


@pytest.fixture(scope="module")
def text_tokenizer():
    captions = [p.caption for p in prompt_set(per_category=50, seed=5)]
    return TextTokenizer.from_captions(captions, TextTokenizerConfig(vocab_size=300, text_len=20, bpe_dropout=0.0))


def test_ground_truth_renders_score_full_marks_and_the_report_is_written(tmp_path, text_tokenizer):
    pipe = GroundTruthPipeline(text_tokenizer)
    report = evaluate_pipeline(pipe, tmp_path, per_category=12, seed=0, batch_size=16)
    accuracy = report["passes"]["no rerank"]["accuracy"]
    for category in CATEGORIES:
        assert accuracy[category]["n"] == 12
        for attribute, value in accuracy[category].items():
            if attribute != "n":
                assert value == 1.0, (category, attribute)
    assert set(accuracy["pair"]) >= {"relation", "full"} and "count" in accuracy["count"]
    passed = report["passes"]["no rerank"]
    assert passed["fid"] >= 0 and "pixels" in report["fid_features"]
    assert passed["position_diversity"]["n"] > 0 and passed["position_diversity"]["normalised_entropy"] > 0.5
    assert "clip_score" not in passed and report["notes"]  # no CLIP: skipped with a note
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "| color_shape |" in markdown and "| full |" in markdown and "100.0%" in markdown
    assert json.loads((tmp_path / "evaluation.json").read_text())["n"] == 48
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == sorted(
        f"no_rerank_{c}.png" for c in CATEGORIES)
    assert [seed for _, seed, _ in pipe.calls] == [0, 1, 2]  # batch b samples with seed + b


def test_categories_evaluates_only_those_prompts_of_the_same_prompt_set(tmp_path, text_tokenizer):
    pipe = GroundTruthPipeline(text_tokenizer)
    report = evaluate_pipeline(pipe, tmp_path, per_category=6, seed=0, batch_size=4, categories=["pair"])
    assert report["categories"] == ["pair"] and report["n"] == 6
    assert list(report["passes"]["no rerank"]["accuracy"]) == ["pair"]
    assert report["passes"]["no rerank"]["accuracy"]["pair"]["full"] == 1.0
    wanted = [p.caption for p in prompt_set(per_category=6, seed=0) if p.category == "pair"]
    assert pipe.prompts == wanted and [n for n, _, _ in pipe.calls] == [4, 2]  # in batches of 4
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "pair (n=6)" in markdown and "single (n=" not in markdown and "position diversity" not in markdown
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["no_rerank_pair.png"]
    with pytest.raises(ValueError, match="expected some of single, pair, count, held_out.*got pairs"):
        evaluate_pipeline(pipe, tmp_path, per_category=2, categories=["pairs"])


def test_the_report_names_the_sampling_settings_its_images_were_drawn_with(tmp_path, text_tokenizer):
    pipe = GroundTruthPipeline(text_tokenizer)
    assert evaluate_pipeline(pipe, tmp_path, per_category=2, categories=["single"])["sampling"] is None
    pipe.config = PipelineConfig(cfg_scale=1.5, cfg_schedule="linear", temperature=0.85, top_k=7)
    report = evaluate_pipeline(pipe, tmp_path, per_category=2, categories=["single"], cfg_scale=2.0)
    assert report["sampling"] == {"cfg_scale": 2.0, "cfg_schedule": "linear", "temperature": 0.85, "top_k": 7,
                                  "top_p": None}  # the call's cfg_scale over pipeline.json's
    assert json.loads((tmp_path / "evaluation.json").read_text())["sampling"]["cfg_scale"] == 2.0
    assert ("Sampling: cfg_scale 2.0, cfg_schedule linear, temperature 0.85, top_k 7, top_p None"
            in (tmp_path / "evaluation.md").read_text())


def test_rerank_pass_and_clip_metrics_are_reported_side_by_side(tmp_path, text_tokenizer):
    torch.manual_seed(0)
    clip = ClipModel(ClipConfig(text_vocab_size=text_tokenizer.total_vocab_size, text_len=text_tokenizer.text_len,
                                image_size=SIZE, embed_dim=16, image_width=8, image_stages=2, text_width=16,
                                text_layers=1, text_heads=2)).eval()
    pipe = GroundTruthPipeline(text_tokenizer, clip)
    report = evaluate_pipeline(pipe, tmp_path, per_category=4, rerank=3, batch_size=16)
    assert list(report["passes"]) == ["no rerank", "rerank 3"]
    assert {rerank for *_, rerank in pipe.calls} == {None, 3}
    for metrics in report["passes"].values():
        assert -100 <= metrics["clip_score"] <= 100 and 0 <= metrics["r_precision"] <= 1
    assert "CLIP image embedding" in report["fid_features"]
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "rerank 3" in markdown and "R-precision" in markdown
    with pytest.raises(ValueError, match="needs the pipeline's CLIP"):
        evaluate_pipeline(GroundTruthPipeline(text_tokenizer), tmp_path, per_category=2, rerank=2)


def test_custom_captions_get_only_clip_metrics(tmp_path, text_tokenizer):
    torch.manual_seed(0)
    clip = ClipModel(ClipConfig(text_vocab_size=text_tokenizer.total_vocab_size, text_len=text_tokenizer.text_len,
                                image_size=SIZE, embed_dim=16, image_width=8, image_stages=2, text_width=16,
                                text_layers=1, text_heads=2)).eval()
    report = evaluate_pipeline(GroundTruthPipeline(text_tokenizer, clip), tmp_path,
                               captions=["a red circle", "two blue squares", "a green star"])
    metrics = report["passes"]["no rerank"]
    assert set(metrics) == {"n", "clip_score", "r_precision"}
    assert (tmp_path / "grids" / "no_rerank_custom.png").is_file()
