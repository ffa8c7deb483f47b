"""Image–caption data sets. Each yields `(PIL RGB image, caption)` or `(transform(image), caption)`.

`build_dataset(DataConfig, split)` picks one from a run config:
- `shapes`: the procedural set of ../shared/SHAPES.md, generated in memory;
- `folder`: a folder of `x.jpg|png|webp` + `x.txt` pairs, searched recursively;
- `coco`: a COCO captions JSON (`path`) and its image folder (`images`);
- `webdataset`: tar shards (`path`: a brace pattern, a glob or one file);
- `emoji`: OpenMoji artwork with names (`pip install dalle_proto[emoji]`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

KINDS = ("shapes", "folder", "coco", "webdataset", "emoji")


@dataclass
class DataConfig:
    kind: str = "shapes"
    path: str | None = None          # folder root, COCO captions JSON, or shard pattern
    images: str | None = None        # COCO image folder
    image_size: int = 64
    train_count: int = 20000         # shapes: scenes in the train split
    eval_count: int = 512            # shapes: scenes in the eval split; others: held-out items
    seed: int = 0
    strict: bool = False             # raise on the first bad image/caption instead of skipping
    # shapes, train split: percent of single / pair / count scenes, e.g. [25, 50, 25]; None is
    # SHAPES.md's 50 / 35 / 15. The eval split keeps SHAPES.md's mix, so validation losses compare
    shapes_mix: list[int] | None = None

    def __post_init__(self) -> None:
        if self.shapes_mix is not None:
            if self.kind != "shapes":
                raise ValueError(f"data.shapes_mix applies to data.kind='shapes' only, got kind={self.kind!r}")
            from .shapes import check_mix

            self.shapes_mix = list(check_mix([int(v) if isinstance(v, float) and v.is_integer() else v
                                              for v in self.shapes_mix]).values())


def build_dataset(data: DataConfig, split: str = "train", transform: Callable | None = None) -> Dataset:
    """The data set a run config describes. `split` is "train" or "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data.kind == "shapes":
        from .shapes import ShapesDataset

        count = data.train_count if split == "train" else data.eval_count
        mix = data.shapes_mix if split == "train" else None
        return ShapesDataset(count, seed=data.seed, size=data.image_size, split=split, transform=transform,
                             mix=mix)
    if data.kind not in KINDS:
        raise ValueError(f"data.kind must be one of {list(KINDS)}, got {data.kind!r}")
    if data.kind == "emoji":
        from .emoji import OpenMojiEmoji

        return OpenMojiEmoji(root=data.path, image_size=data.image_size, transform=transform)
    if not data.path:
        raise ValueError(f"data.path is required for data.kind={data.kind!r}")
    if data.kind == "folder":
        from .image_caption_folder import ImageCaptionFolder

        return ImageCaptionFolder(data.path, transform=transform, strict=data.strict, seed=data.seed)
    if data.kind == "coco":
        from .coco import CocoCaptions

        if not data.images:
            raise ValueError("data.images (the COCO image folder) is required for data.kind='coco'")
        return CocoCaptions(data.path, data.images, transform=transform, strict=data.strict, seed=data.seed)
    from .webdataset_shards import WebDatasetShards

    return WebDatasetShards(data.path, transform=transform, strict=data.strict, seed=data.seed)
