"""Captions in, pictures out: the text tokenizer, the transformer and the image tokenizer in one object.

    pipe = DallePipeline.from_pretrained("checkpoints/shapes")
    images = pipe("a red circle to the left of a blue square", num_images=4, seed=0)  # 4 PIL images
    make_image_grid(images).save("samples.png")

A pipeline is a folder, and a training run's `out_dir` already is one (stages.py writes it):

    text_tokenizer/     tokenizer.json                       (TextTokenizer)
    image_tokenizer/    config.json + model.safetensors      (ImageTokenizer)
    transformer/        config.json + model.safetensors      (DalleTransformer)
    clip/               config.json + model.safetensors      (ClipModel; optional, for reranking)
                        or ensemble.json + member_{i}/       (ClipEnsemble)
    pipeline.json       sampling defaults (PipelineConfig; optional)

Loading checks that the parts agree (text vocabulary and length, codebook size and token grid), so a
transformer trained on another tokenizer fails with both numbers named instead of drawing noise.

`pipe(..., rerank=N)` draws N candidates per returned image and keeps the one the CLIP model scores
highest against the prompt (the paper reranks 512 samples per caption this way).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from dalle_proto.image_grid import to_pil_images
from dalle_proto.image_tokenizer import ImageTokenizer
from dalle_proto.pretrained import atomic_write_bytes, config_from_dict, read_json_object
from dalle_proto.sampling import CFG_SCHEDULES, generate_image_tokens
from dalle_proto.text_tokenizer import TextTokenizer
from dalle_proto.transformer import DalleTransformer

PIPELINE_CONFIG_NAME = "pipeline.json"
DECODE_BATCH = 64  # token grids decoded to pixels at a time, to bound the decoder's activations
TEXT_TOKENIZER_DIR, IMAGE_TOKENIZER_DIR, TRANSFORMER_DIR, CLIP_DIR = (
    "text_tokenizer", "image_tokenizer", "transformer", "clip")
LAYOUT = (f"{TEXT_TOKENIZER_DIR}/ (tokenizer.json), {IMAGE_TOKENIZER_DIR}/ and {TRANSFORMER_DIR}/ "
          f"(config.json + model.safetensors each); optional: {CLIP_DIR}/ and {PIPELINE_CONFIG_NAME}")


@dataclass
class PipelineConfig:
    """Sampling defaults, saved as pipeline.json; a call's own arguments override them."""

    cfg_scale: float = 3.0  # classifier-free guidance; 1.0 turns it off
    cfg_schedule: str = "constant"  # or "linear": from 1 at the first image token to cfg_scale at the last
    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"PipelineConfig: cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")


class DallePipeline:
    """Text tokenizer + transformer + image tokenizer (+ optional CLIP for reranking)."""

    def __init__(self, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer,
                 transformer: DalleTransformer, clip: Any | None = None,
                 config: PipelineConfig | None = None, source: str = "DallePipeline") -> None:
        _check_parts(text_tokenizer, image_tokenizer, transformer, clip, source)
        self.text_tokenizer = text_tokenizer.eval()  # no BPE dropout at inference
        self.image_tokenizer = image_tokenizer.eval()
        self.transformer = transformer.eval()
        self.clip = clip.eval() if clip is not None and hasattr(clip, "eval") else clip
        self.config = config or PipelineConfig()

    # ---- saving / loading --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "DallePipeline":
        """Load a pipeline folder (see the module docstring), e.g. a training run's out_dir.

        dtype: the transformer's weights for sampling. bf16 by default: sampling keeps no fp32
        master weights, and on a CPU bf16 weights sample about 1.5x faster than fp32 ones
        (benchmarks/transformer.py); pass torch.float32 for fp32 logits. The KV cache stays fp32 on
        the CPU (`DalleTransformer.new_cache`); the image tokenizer and CLIP keep fp32."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such pipeline folder; expected a folder with {LAYOUT}")
        missing = [f"{name}/" for name in (TEXT_TOKENIZER_DIR, IMAGE_TOKENIZER_DIR, TRANSFORMER_DIR)
                   if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: not a pipeline folder, {', '.join(missing)} missing; "
                                    f"expected {LAYOUT}")
        text_tokenizer = TextTokenizer.from_pretrained(folder / TEXT_TOKENIZER_DIR)
        image_tokenizer = ImageTokenizer.from_pretrained(folder / IMAGE_TOKENIZER_DIR)
        transformer = DalleTransformer.from_pretrained(folder / TRANSFORMER_DIR, dtype=dtype)
        clip = None
        if (folder / CLIP_DIR).is_dir():
            from dalle_proto.clip import load_clip  # only pipelines that ship a CLIP need it

            clip = load_clip(folder / CLIP_DIR)
        config = PipelineConfig()
        config_path = folder / PIPELINE_CONFIG_NAME
        if config_path.is_file():
            values = read_json_object(config_path, f"the {PIPELINE_CONFIG_NAME} written by save_pretrained: "
                                                   "an object of PipelineConfig fields (sampling defaults)")
            config = config_from_dict(PipelineConfig, values, source=str(config_path))
        pipe = cls(text_tokenizer, image_tokenizer, transformer.to(dtype), clip, config, source=str(folder))
        return pipe.to(device)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the folder that `from_pretrained` reads. `dtype` (e.g. torch.bfloat16) casts the
        floating-point weights, to keep shipped checkpoints small."""
        folder = Path(path)
        self.text_tokenizer.save_pretrained(folder / TEXT_TOKENIZER_DIR)
        self.image_tokenizer.save_pretrained(folder / IMAGE_TOKENIZER_DIR, dtype=dtype)
        self.transformer.save_pretrained(folder / TRANSFORMER_DIR, dtype=dtype)
        if self.clip is not None:
            self.clip.save_pretrained(folder / CLIP_DIR, dtype=dtype)
        config = json.dumps(dataclasses.asdict(self.config), indent=2) + "\n"
        atomic_write_bytes(folder / PIPELINE_CONFIG_NAME, config.encode())
        return folder

    def to(self, device: torch.device | str) -> "DallePipeline":
        """Move every model to `device`; returns self."""
        self.image_tokenizer.to(device)
        self.transformer.to(device)
        if self.clip is not None:
            self.clip.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.image_head.weight.device

    # ---- sampling ----------------------------------------------------------------------------
    def __call__(self, prompts: str | Sequence[str], num_images: int = 4, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cfg_scale: float | None = None, rerank: int | None = None,
                 progress: bool = False, cfg_schedule: str | None = None) -> list[Image.Image]:
        """`num_images` RGB images per prompt, all of the first prompt's first, then the second's, ...

        temperature, top_k, top_p, cfg_scale, cfg_schedule: None takes the default from `self.config`
        (pipeline.json; change `pipe.config` to change a default, e.g. `pipe.config.top_k = None`).
        seed: the same seed, prompts and settings give the same pixels (on the same device).
        rerank: draw this many candidates per returned image and keep the one `self.clip` scores
        highest against its prompt; needs a pipeline with a CLIP model.
        """
        prompts = _check_prompts(prompts)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        if rerank is not None:
            if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 1:
                raise ValueError(f"rerank must be an int >= 1 (candidates per image) or None, got {rerank!r}")
            if self.clip is None and rerank > 1:  # rerank=1 is one candidate: nothing to score
                raise ValueError(f"rerank={rerank} needs a CLIP model, but this pipeline has none: add a "
                                 f"trained one as the pipeline folder's {CLIP_DIR}/ (dalle-proto train-clip) "
                                 "or set pipe.clip")
        c = self.config
        candidates = rerank or 1
        with torch.inference_mode():
            text_ids = self.text_tokenizer.eval().encode(prompts).to(self.device)  # (B, T)
            rows = text_ids.repeat_interleave(num_images, dim=0)  # (B*n, T)
            tokens = generate_image_tokens(
                self.transformer, rows, seed=seed, num_images_per_text=candidates, progress=progress,
                temperature=c.temperature if temperature is None else temperature,
                top_k=c.top_k if top_k is None else top_k, top_p=c.top_p if top_p is None else top_p,
                cfg_scale=c.cfg_scale if cfg_scale is None else cfg_scale,
                cfg_schedule=c.cfg_schedule if cfg_schedule is None else cfg_schedule)  # (B*n*k, h, w)
            images = torch.cat([self.image_tokenizer.decode(chunk).float()  # (b, 3, H, W) in [-1, 1]
                                for chunk in tokens.split(DECODE_BATCH)])  # (B*n*k, 3, H, W)
            if rerank is not None and candidates > 1:
                images = self._best_of(images, rows.repeat_interleave(candidates, dim=0), candidates)
        return to_pil_images(images)  # B*n images

    def _best_of(self, images: torch.Tensor, text_ids: torch.Tensor, k: int) -> torch.Tensor:
        """(R*k, 3, H, W) candidates, k per row in a row -> (R, 3, H, W): the best-scored of each k."""
        scores = torch.as_tensor(self.clip.score(images, text_ids)).float()  # (R*k,)
        if scores.shape != (images.shape[0],):
            raise ValueError(f"clip.score must return one score per image, shape ({images.shape[0]},), "
                             f"got {tuple(scores.shape)}")
        best = scores.view(-1, k).argmax(1).to(images.device)  # (R,) index within each group
        return images[best + torch.arange(0, images.shape[0], k, device=images.device)]

    def __repr__(self) -> str:
        t = self.transformer.config
        return (f"DallePipeline(text: {self.text_tokenizer.vocab_size} BPE ids x {t.text_len}, "
                f"image: {t.image_grid}x{t.image_grid} tokens over {t.image_vocab_size} codes, "
                f"transformer: {self.transformer.num_parameters() / 1e6:.1f}M parameters, "
                f"clip: {'yes' if self.clip is not None else 'no'}, {self.config})")


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected a caption or a non-empty list of captions, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i}: expected str, got {type(prompt).__name__}: {prompt!r:.80}")
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty ({prompt!r}); the empty caption is the null text of "
                             "guidance, not a prompt: write what the image should show")
    return prompts


def _check_parts(text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer,
                 transformer: DalleTransformer, clip: Any | None, source: str) -> None:
    """Every part must have been trained against the same vocabularies and grid."""
    t = transformer.config
    pairs = [
        (f"{TEXT_TOKENIZER_DIR}/ vocab_size", text_tokenizer.vocab_size, "text_vocab_size", t.text_vocab_size),
        (f"{TEXT_TOKENIZER_DIR}/ text_len", text_tokenizer.text_len, "text_len", t.text_len),
        (f"{TEXT_TOKENIZER_DIR}/ pad id (None: one pad id per position)", text_tokenizer.pad_id,
         "text_pad_id", t.text_pad_id),
        (f"{IMAGE_TOKENIZER_DIR}/ codebook size (n_embed)", image_tokenizer.codebook_size,
         "image_vocab_size", t.image_vocab_size),
        (f"{IMAGE_TOKENIZER_DIR}/ token grid", image_tokenizer.grid_size, "image_grid", t.image_grid),
    ]
    for part, value, key, expected in pairs:
        if value != expected:
            raise ValueError(f"{source}: the parts do not match: {part} is {value}, but {TRANSFORMER_DIR}/ "
                             f"was built for {key}={expected}")
    clip_config = getattr(clip, "config", None)
    if clip_config is None:
        return
    image_side = image_tokenizer.grid_size * image_tokenizer.config.downsample_factor
    for key, expected in (("text_vocab_size", text_tokenizer.total_vocab_size),
                          ("text_len", text_tokenizer.text_len), ("image_size", image_side)):
        value = getattr(clip_config, key, expected)
        if value != expected:
            raise ValueError(f"{source}: the parts do not match: {CLIP_DIR}/ has {key}={value}, but the "
                             f"tokenizers give {expected}")
