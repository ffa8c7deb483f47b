"""DallePipeline: prompts -> PIL images, the pipeline folder, reranking, and `dalle-proto generate`.

The parts are built untrained and tiny (32 px images, an 8x8 token grid), so sampling takes well
under a second; what is tested is the plumbing, not the pictures.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_proto.cli import DEFAULT_MODEL, main
from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from dalle_proto.pipeline import DallePipeline, PipelineConfig
from dalle_proto.sampling import generate_image_tokens
from dalle_proto.text_tokenizer import TextTokenizer, TextTokenizerConfig
from dalle_proto.transformer import DalleTransformer, TransformerConfig

CAPTIONS = ["a red circle", "two blue squares", "a green triangle in the top left",
            "a small yellow star to the left of a large red circle"] * 4


def tiny_parts(image_vocab_size: int = 64):
    torch.manual_seed(0)
    text_tokenizer = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(vocab_size=300, text_len=12))
    image_tokenizer = ImageTokenizer(ImageTokenizerConfig(
        resolution=32, ch=32, ch_mult=[1, 1, 1], z_channels=32, embed_dim=8, n_embed=64)).eval()
    transformer = DalleTransformer(TransformerConfig.from_size(
        "tiny", text_vocab_size=text_tokenizer.vocab_size, text_len=12, image_vocab_size=image_vocab_size,
        image_grid=8)).eval()
    return text_tokenizer, image_tokenizer, transformer


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


@pytest.fixture(scope="module")
def pipe():
    return DallePipeline(*tiny_parts())


@pytest.fixture(scope="module")
def pipe_folder(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("pipeline") / "tiny")


def pixel_difference(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference between two uint8 pixel arrays, in 0..255 steps."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_images_per_prompt_in_prompt_order(pipe):
    prompts = ["a red circle", "two blue squares"]
    images = pipe(prompts, num_images=3, temperature=0)
    assert len(images) == 6
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (32, 32) for im in images)
    # greedy sampling depends only on the prompt: its tokens are the same whatever else is in the batch
    text = pipe.text_tokenizer.encode(prompts)  # (2, T)
    greedy = dict(temperature=0, cfg_scale=pipe.config.cfg_scale)
    in_batch = generate_image_tokens(pipe.transformer, text.repeat_interleave(3, dim=0), **greedy)  # (6, h, w)
    alone = [generate_image_tokens(pipe.transformer, text[i:i + 1], **greedy) for i in range(2)]  # 2 x (1, h, w)
    assert torch.equal(in_batch, torch.cat([alone[0]] * 3 + [alone[1]] * 3))
    assert not torch.equal(alone[0], alone[1])
    # ... and so are its pixels, up to rounding: the decoder's CPU conv kernels change with the batch
    # shape (6 images vs 1), which moved 3 of 18,432 values by 1 on an AMX Xeon. 2/255 allows that;
    # the two prompts' images differ by far more, so a swapped order or a wrong image still fails.
    first = pipe("a red circle", num_images=1, temperature=0)
    second = pipe(["two blue squares"], num_images=1, temperature=0)
    assert pixel_difference(pixels(images), pixels(first * 3 + second * 3)) <= 2
    assert pixel_difference(pixels(first), pixels(second)) > 20


def test_same_seed_same_pixels_other_seed_other_pixels(pipe):
    a = pixels(pipe("a red circle", num_images=2, seed=1))
    b = pixels(pipe("a red circle", num_images=2, seed=1))
    c = pixels(pipe("a red circle", num_images=2, seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the images of one prompt are different draws


def test_sampling_defaults_come_from_the_config(pipe):
    greedy = DallePipeline(pipe.text_tokenizer, pipe.image_tokenizer, pipe.transformer,
                           config=PipelineConfig(temperature=0.0))
    np.testing.assert_array_equal(pixels(greedy("a red circle", num_images=1, seed=1)),
                                  pixels(pipe("a red circle", num_images=1, seed=2, temperature=0)))


def test_save_load_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.config = PipelineConfig(cfg_scale=2.0, top_k=20)
    try:
        folder = pipe.save_pretrained(tmp_path / "p")
        assert DallePipeline.from_pretrained(folder).transformer.image_head.weight.dtype == torch.bfloat16
        loaded = DallePipeline.from_pretrained(folder, dtype=torch.float32)  # the fp32 weights it saved
        assert loaded.config == PipelineConfig(cfg_scale=2.0, top_k=20) and loaded.clip is None
        np.testing.assert_array_equal(pixels(pipe(["a red circle", "two blue squares"], num_images=2, seed=3)),
                                      pixels(loaded(["a red circle", "two blue squares"], num_images=2, seed=3)))
    finally:
        pipe.config = PipelineConfig()


def test_a_run_out_dir_without_pipeline_json_loads_with_default_settings(pipe_folder, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(pipe_folder, folder)
    (folder / "pipeline.json").unlink()
    assert DallePipeline.from_pretrained(folder).config == PipelineConfig()


def test_mismatched_parts_name_the_folder_and_both_numbers(pipe_folder, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(pipe_folder, folder)
    other_transformer = tiny_parts(image_vocab_size=48)[2]
    other_transformer.save_pretrained(folder / "transformer")
    with pytest.raises(ValueError) as e:
        DallePipeline.from_pretrained(folder)
    message = str(e.value)
    assert str(folder) in message and "image_tokenizer/" in message
    assert "is 64" in message and "image_vocab_size=48" in message


def test_missing_part_names_the_path_and_the_layout(pipe_folder, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(pipe_folder, folder)
    shutil.rmtree(folder / "image_tokenizer")
    with pytest.raises(FileNotFoundError) as e:
        DallePipeline.from_pretrained(folder)
    message = str(e.value)
    assert str(folder) in message and "image_tokenizer/ missing" in message
    assert all(name in message for name in ("text_tokenizer/", "transformer/", "clip/", "pipeline.json"))
    with pytest.raises(FileNotFoundError, match="no such pipeline folder"):
        DallePipeline.from_pretrained(tmp_path / "nowhere")


def test_unknown_key_in_pipeline_json_is_an_error(pipe_folder, tmp_path):
    folder = tmp_path / "typo"
    shutil.copytree(pipe_folder, folder)
    (folder / "pipeline.json").write_text('{"cfg_scal": 2.0}')
    with pytest.raises(ValueError, match=r"pipeline\.json.*'cfg_scal'"):
        DallePipeline.from_pretrained(folder)


def test_guidance_schedule_from_pipeline_json_or_the_call(pipe_folder, tmp_path):
    folder = tmp_path / "ramp"
    shutil.copytree(pipe_folder, folder)
    # a large scale: the tiny random model's text barely moves its logits
    (folder / "pipeline.json").write_text('{"cfg_scale": 50.0, "cfg_schedule": "linear"}')
    ramp = DallePipeline.from_pretrained(folder)
    assert ramp.config.cfg_schedule == "linear"
    by_default = pixels(ramp("a red circle", num_images=2, seed=4))
    np.testing.assert_array_equal(by_default, pixels(ramp("a red circle", num_images=2, seed=4,
                                                          cfg_schedule="linear")))
    assert not np.array_equal(by_default, pixels(ramp("a red circle", num_images=2, seed=4, cfg_schedule="constant")))
    (folder / "pipeline.json").write_text('{"cfg_schedule": "cosine"}')
    with pytest.raises(ValueError, match=r"pipeline\.json.*cfg_schedule must be one of"):
        DallePipeline.from_pretrained(folder)


@pytest.mark.parametrize("prompts", ["", "   ", [], ["a red circle", ""]])
def test_empty_prompt_is_rejected(pipe, prompts):
    with pytest.raises(ValueError, match="empty"):
        pipe(prompts, num_images=1)


class FakeClip:
    """Scores an image by its mean brightness and records what it was given."""

    def __init__(self):
        self.calls = []

    def score(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        scores = images.mean(dim=(1, 2, 3))  # (B,)
        self.calls.append((images.clone(), text_ids.clone(), scores.clone()))
        return scores


def test_rerank_keeps_the_best_scored_candidate_per_image(pipe):
    prompts, n, k = ["a red circle", "two blue squares"], 2, 3
    candidates = pixels(pipe(prompts, num_images=n * k, seed=5))  # the same draws, unranked
    clip = FakeClip()
    reranked = DallePipeline(pipe.text_tokenizer, pipe.image_tokenizer, pipe.transformer, clip=clip)
    best = pixels(reranked(prompts, num_images=n, rerank=k, seed=5))
    assert best.shape == (len(prompts) * n, 32, 32, 3)

    (images, text_ids, scores), = clip.calls
    assert images.shape == (len(prompts) * n * k, 3, 32, 32) and -1 <= images.min() <= images.max() <= 1
    expected_text = pipe.text_tokenizer.encode(prompts).repeat_interleave(n * k, dim=0)
    torch.testing.assert_close(text_ids.cpu(), expected_text)
    chosen = scores.view(-1, k).argmax(1) + torch.arange(0, len(scores), k)
    assert chosen.tolist() != list(range(0, len(scores), k)), "the fake scores should not favour the first"
    np.testing.assert_array_equal(best, candidates[chosen.numpy()])


def test_rerank_without_clip_is_a_clear_error_except_one_candidate(pipe):
    with pytest.raises(ValueError, match="CLIP"):
        pipe("a red circle", num_images=1, rerank=2)
    # rerank=1 is "one sample" (issue 16's measure): it needs no CLIP and draws what no rerank draws
    assert pipe.clip is None
    np.testing.assert_array_equal(pixels(pipe("a red circle", num_images=2, rerank=1, seed=4)),
                                  pixels(pipe("a red circle", num_images=2, seed=4)))
    with pytest.raises(ValueError, match="rerank must be an int >= 1"):
        DallePipeline(pipe.text_tokenizer, pipe.image_tokenizer, pipe.transformer, clip=FakeClip())(
            "a red circle", rerank=0)


def test_cli_generate_writes_a_grid_png(pipe_folder, tmp_path, capsys):
    out = tmp_path / "grids" / "samples.png"
    main(["generate", "a red circle", "two blue squares", "--num-images", "3", "--model", str(pipe_folder),
          "--out", str(out), "--seed", "1", "--cfg-scale", "1.5", "--top-k", "10", "--device", "cpu"])
    assert capsys.readouterr().out.strip().endswith(str(out))
    grid = Image.open(out)
    assert grid.width > grid.height > 2 * 128  # 3 columns, 2 rows of cells of at least 128 px


def test_cli_generate_without_a_model_says_how_to_get_one(tmp_path):
    assert DEFAULT_MODEL == Path(__file__).resolve().parents[1] / "checkpoints" / "shapes"
    with pytest.raises(SystemExit) as e:
        main(["generate", "a red circle", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert str(tmp_path / "missing") in str(e.value) and "train-text-tokenizer" in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_cli_export_writes_a_bf16_folder_that_samples_like_the_bf16_loaded_original(pipe_folder, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "shipped"
    main(["export", str(pipe_folder), str(out)])
    with safe_open(str(out / "transformer" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert not (out / "checkpoints").exists() and (out / "pipeline.json").is_file()
    # the transformer samples in bf16 by default either way, so the exported copy draws the same tokens
    original, shipped = DallePipeline.from_pretrained(pipe_folder), DallePipeline.from_pretrained(out)
    text = original.text_tokenizer.encode(["a red circle", "two blue squares"])
    assert torch.equal(generate_image_tokens(original.transformer, text, seed=5),
                       generate_image_tokens(shipped.transformer, text, seed=5))


def test_cli_export_writes_the_given_sampling_defaults_and_keeps_the_others(pipe_folder, tmp_path):
    out = tmp_path / "shipped"
    main(["export", str(pipe_folder), str(out), "--cfg-scale", "1.5", "--top-k", "32"])
    values = json.loads((out / "pipeline.json").read_text())
    assert values == {**dataclasses.asdict(PipelineConfig()), "cfg_scale": 1.5, "top_k": 32}
    assert DallePipeline.from_pretrained(out).config.cfg_scale == 1.5
