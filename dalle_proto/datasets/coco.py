"""MS-COCO style captions: a captions JSON plus a folder of images.

The JSON is the ``captions_train2017.json`` layout::

    {"images":      [{"id": 9, "file_name": "000000000009.jpg", ...}, ...],
     "annotations": [{"image_id": 9, "caption": "A plate of food.", ...}, ...]}

Any data set written in this layout works; only the four keys above are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from dalle_proto.datasets.image_checks import (
    BadSample,
    BadSampleReport,
    CheckedImageCaptionList,
    check_image_header,
)


class CocoCaptions(CheckedImageCaptionList):
    """Map-style data set over a COCO captions JSON and its image folder.

    Yields ``(image, caption)`` with a ``PIL.Image`` in RGB (non-RGB images are converted,
    transparency composited on white) and one of the image's captions drawn at random
    (reproducible from ``seed``), or ``(transform(image), caption)``. ``captions(i)`` lists all
    captions of item ``i``. Items are sorted by ``file_name``.

    A JSON that lacks a required key raises ``ValueError`` naming the file and the key. Images with
    no (non-blank) caption, files missing from ``image_dir`` or that do not open, and captions that
    point at an unknown image id are bad samples: skipped with ONE warning (``strict=False``) or
    raised as ``ValueError`` (``strict=True``). A body that only fails on full decode is handled
    as in ``ImageCaptionFolder``: raise when strict, else warn and return the next good item.
    """

    def __init__(
        self,
        captions_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        strict: bool = False,
        seed: int = 0,
    ):
        self.captions_json = Path(captions_json)
        self.image_dir = Path(image_dir)
        self.source = f"CocoCaptions({str(self.captions_json)!r})"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.source}: image_dir {self.image_dir} is not a folder")

        file_names, captions_by_id, orphans = _read_coco_json(self.captions_json)
        report = BadSampleReport(self.source, strict)
        for annotation_index, image_id in orphans:
            report.add(f"annotations[{annotation_index}]", f"caption for unknown image_id {image_id!r}")

        images: list[Path] = []
        captions: list[list[str]] = []
        names: list[str] = []
        for image_id, file_name in sorted(file_names.items(), key=lambda item: item[1]):
            path = self.image_dir / file_name
            try:
                image_captions = captions_by_id.get(image_id, [])
                if not image_captions:
                    raise BadSample(f"image id {image_id!r} has no non-blank caption")
                if not path.is_file():
                    raise BadSample(f"image file not found in {self.image_dir}")
                check_image_header(path)
            except BadSample as exc:
                report.add(file_name, str(exc))
                continue
            images.append(path)
            captions.append(image_captions)
            names.append(file_name)

        if not images:
            raise ValueError(
                f"CocoCaptions: no usable image-caption pairs from {self.captions_json} with images in "
                f"{self.image_dir}" + (f" ({report.summary(len(report))})" if len(report) else "")
            )
        report.warn_if_any(total=len(images) + len(report))
        self._set_pairs(images, captions, names, transform, strict, seed, list(report.bad))


def _read_coco_json(path: Path) -> tuple[dict[Any, str], dict[Any, list[str]], list[tuple[int, Any]]]:
    """Parse and validate the JSON: (id -> file_name, id -> captions, [(annotation index, unknown id)])."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"CocoCaptions: captions JSON {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"CocoCaptions: {path} is not valid JSON ({exc})") from exc

    def require(obj: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(
                f"CocoCaptions: {path}: {where} has no key {key!r} (expected the COCO captions layout)"
            )
        if not isinstance(obj[key], kind):
            raise ValueError(
                f"CocoCaptions: {path}: {where}[{key!r}] is a {type(obj[key]).__name__}, expected {kind}"
            )
        return obj[key]

    images = require(data, "images", "the top-level object", list)
    annotations = require(data, "annotations", "the top-level object", list)
    file_names: dict[Any, str] = {}
    for i, entry in enumerate(images):
        image_id = require(entry, "id", f"images[{i}]", (int, str))
        if image_id in file_names:
            raise ValueError(f"CocoCaptions: {path}: images[{i}] repeats id {image_id!r}")
        file_names[image_id] = require(entry, "file_name", f"images[{i}]", str)

    captions_by_id: dict[Any, list[str]] = {}
    orphans: list[tuple[int, Any]] = []
    for i, entry in enumerate(annotations):
        image_id = require(entry, "image_id", f"annotations[{i}]", (int, str))
        caption = require(entry, "caption", f"annotations[{i}]", str).strip()
        if image_id not in file_names:
            orphans.append((i, image_id))
        elif caption:  # blank captions are dropped; an image left with none is reported as bad
            captions_by_id.setdefault(image_id, []).append(" ".join(caption.split()))
    return file_names, captions_by_id, orphans
