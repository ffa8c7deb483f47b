"""The run config: one YAML that drives every training stage, from captions to a trained transformer.

Sections are the components' own config dataclasses, so a key means the same thing in a YAML file,
on the command line (`transformer.depth=4`) and in a saved `config.json`. Stages chain through
`out_dir`: `text_tokenizer/`, `image_tokenizer/`, `token_cache/{train,eval}/`, `transformer/`,
`clip/`. With `init_from` (a pipeline folder), `encode` copies that folder's tokenizers into
`out_dir` and `train` starts from its transformer, so a converted or shipped model is fine-tuned
with the same two commands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .clip import ClipArchitecture
from .clip_training import ClipTrainConfig
from .config import load_config
from .datasets import DataConfig
from .image_tokenizer import ImageTokenizerConfig
from .image_tokenizer_training import ImageTokenizerTrainConfig
from .text_tokenizer import TextTokenizerConfig
from .transformer_config import SIZES, TransformerConfig
from .transformer_training import TransformerTrainConfig


@dataclass
class TransformerSection(TransformerConfig):
    """TransformerConfig plus `size`, a name from the registry (`transformer_config.SIZES`) that fills the
    section's defaults. text_vocab_size, text_len, image_vocab_size and image_grid are taken from the
    trained text tokenizer and the token cache at train time, whatever is written here."""

    size: str | None = None

    def to_transformer_config(self, text_vocab_size: int, text_len: int, image_vocab_size: int,
                              image_grid: int) -> TransformerConfig:
        values = {k: getattr(self, k) for k in TransformerConfig.__dataclass_fields__}
        values.update(text_vocab_size=text_vocab_size, text_len=text_len,
                      image_vocab_size=image_vocab_size, image_grid=image_grid)
        return TransformerConfig(**values)


@dataclass
class RunConfig:
    out_dir: str = "runs/shapes"
    data: DataConfig = field(default_factory=DataConfig)
    text_tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    image_tokenizer_training: ImageTokenizerTrainConfig = field(default_factory=ImageTokenizerTrainConfig)
    # a saved image tokenizer folder (save_pretrained) to use instead of out_dir/image_tokenizer
    image_tokenizer_path: str | None = None
    # a pipeline folder to fine-tune (e.g. one `dalle-proto convert mindalle` wrote): its text
    # tokenizer, image tokenizer, transformer config and weights are this run's (stages.py)
    init_from: str | None = None
    transformer: TransformerSection = field(default_factory=TransformerSection)
    training: TransformerTrainConfig = field(default_factory=TransformerTrainConfig)
    # the CLIP reranker (train-clip): text_vocab_size, text_len and image_size come from the trained
    # text tokenizer and data.image_size
    clip: ClipArchitecture = field(default_factory=ClipArchitecture)
    clip_training: ClipTrainConfig = field(default_factory=ClipTrainConfig)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)


def _size_preset(name: str) -> dict:
    if name not in SIZES:
        raise ValueError(f"unknown transformer.size {name!r}; valid sizes: {sorted(SIZES)}")
    return {"transformer": SIZES[name]}


def load_run_config(yaml_paths: list[str | Path] = (), overrides: list[str] = ()) -> RunConfig:
    """YAML files, then dotted overrides; `transformer.size` fills the transformer section first."""
    return load_config(RunConfig, yaml_paths, overrides, presets={"transformer.size": _size_preset})
