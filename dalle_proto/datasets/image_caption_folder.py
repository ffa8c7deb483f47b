"""A folder of ``x.jpg`` + ``x.txt`` pairs: the simplest way to train on your own images.

Layout (searched recursively, hidden files and folders such as ``.ipynb_checkpoints`` skipped)::

    root/
      cat.jpg   cat.txt          <- one caption per line; blank lines ignored
      pets/dog.PNG   pets/dog.txt
      birds/owl.webp birds/owl.txt

Each image with extension jpg/jpeg/png/webp (any case) pairs with the ``.txt`` file of the same stem
in the same folder. Each sample draws one of that image's captions at random.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from dalle_proto.datasets.image_checks import (
    IMAGE_EXTENSIONS,
    BadSample,
    BadSampleReport,
    CheckedImageCaptionList,
    check_image_header,
    read_captions,
)


class ImageCaptionFolder(CheckedImageCaptionList):
    """Map-style data set over a folder of image + caption-file pairs.

    Yields ``(image, caption)``: a ``PIL.Image`` in RGB (grayscale, palette, 16-bit and CMYK are
    converted; transparency is composited on white) and one caption ``str``; or
    ``(transform(image), caption)`` when ``transform`` is given. ``captions(i)`` lists all captions
    of item ``i``. Files are in sorted order of their path relative to ``root``.

    Bad pairs (image without ``.txt``, empty caption file, image that does not open) are found at
    construction: with ``strict=False`` they are left out and ONE warning lists their count and
    the first few names; with ``strict=True`` the first one raises ``ValueError``.
    Construction opens every image header (``Image.verify``, ~0.1 ms per JPEG); a body that is
    truncated is only noticed when ``__getitem__`` decodes it: then ``strict=True`` raises
    ``ValueError`` naming the file, and ``strict=False`` warns, remembers the file as bad, and
    returns the next good item instead (index ``i+1``, ``i+2``, ... wrapping around), so a given
    index always maps to the same substitute. ``skipped`` lists every bad file found so far.

    The caption choice is reproducible from ``seed`` (see ``ProcessLocalRandom`` for DataLoader
    workers: each worker draws differently, reproducibly when torch is seeded).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        strict: bool = False,
        seed: int = 0,
    ):
        self.root = Path(root)
        self.source = f"ImageCaptionFolder({str(self.root)!r})"
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.source}: {self.root} is not a folder")

        report = BadSampleReport(self.source, strict)
        images: list[Path] = []
        captions: list[list[str]] = []
        for image_path, caption_path in _find_pairs(self.root):
            name = image_path.relative_to(self.root).as_posix()
            try:
                if caption_path is None:
                    raise BadSample(f"no caption file {image_path.stem}.txt next to it")
                image_captions = read_captions(caption_path)
                check_image_header(image_path)
            except BadSample as exc:
                report.add(name, str(exc))
                continue
            images.append(image_path)
            captions.append(image_captions)

        if not images:
            detail = f" ({report.summary(len(report))})" if len(report) else ""
            raise ValueError(
                f"ImageCaptionFolder: no usable image-caption pairs under {self.root}; expected "
                f"x.jpg|jpeg|png|webp next to x.txt with one caption per line{detail}"
            )
        report.warn_if_any(total=len(images) + len(report))
        names = [path.relative_to(self.root).as_posix() for path in images]
        self._set_pairs(images, captions, names, transform, strict, seed, list(report.bad))


def _find_pairs(root: Path) -> list[tuple[Path, Path | None]]:
    """Sorted (image, caption file or None when missing) pairs under ``root``."""
    pairs: list[tuple[Path, Path | None]] = []
    seen_dirs: set[str] = set()
    # followlinks: data folders are often symlinked; seen_dirs stops symlink loops.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        by_lower = {f.lower(): f for f in filenames}
        for filename in filenames:
            stem, ext = os.path.splitext(filename)
            if filename.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue  # hidden files include macOS "._x.jpg" metadata, which are not images
            image_path = Path(dirpath) / filename
            caption_name = stem + ".txt"
            caption_name = caption_name if caption_name in filenames else by_lower.get(caption_name.lower())
            pairs.append((image_path, None if caption_name is None else Path(dirpath) / caption_name))
    pairs.sort(key=lambda pair: pair[0].relative_to(root).as_posix())
    return pairs
