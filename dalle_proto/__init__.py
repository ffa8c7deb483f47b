"""dalle_proto: a DALL·E reproduction — BPE text tokens + discrete image tokens + one transformer.

The main classes import from the package itself, as in diffusers:

    from dalle_proto import DallePipeline, make_image_grid

Each name is imported on first use (PEP 562 `__getattr__`), so `import dalle_proto` stays fast and
loads neither torch nor Lightning until a class is touched.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DallePipeline": "pipeline", "PipelineConfig": "pipeline",
    "TextTokenizer": "text_tokenizer", "TextTokenizerConfig": "text_tokenizer",
    "ImageTokenizer": "image_tokenizer", "ImageTokenizerConfig": "image_tokenizer",
    "DalleTransformer": "transformer", "TransformerConfig": "transformer",
    "ClipModel": "clip", "ClipEnsemble": "clip", "ClipConfig": "clip", "load_clip": "clip",
    "generate_image_tokens": "sampling",
    "make_image_grid": "image_grid",
    "RunConfig": "run_config", "load_run_config": "run_config",
    "build_dataset": "datasets", "DataConfig": "datasets",
    "evaluate_pipeline": "evaluation",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for editors and type checkers; at run time the names load lazily
    from .clip import ClipConfig, ClipEnsemble, ClipModel, load_clip
    from .datasets import DataConfig, build_dataset
    from .evaluation import evaluate_pipeline
    from .image_grid import make_image_grid
    from .image_tokenizer import ImageTokenizer, ImageTokenizerConfig
    from .pipeline import DallePipeline, PipelineConfig
    from .run_config import RunConfig, load_run_config
    from .sampling import generate_image_tokens
    from .text_tokenizer import TextTokenizer, TextTokenizerConfig
    from .transformer import DalleTransformer, TransformerConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dalle_proto' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
