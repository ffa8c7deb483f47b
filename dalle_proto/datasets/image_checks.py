"""Shared input checks for the image–caption data sets.

Every loader (folder, COCO, WebDataset shards) follows one policy for bad input:

* bad = an image without a caption, an empty caption (only blank lines), an image file that
  cannot be decoded (corrupt, truncated, not an image at all);
* ``strict=False`` (default): bad samples are skipped and counted, and ONE warning lists the
  count and the first few files with their reasons;
* ``strict=True``: the first bad sample raises ``ValueError`` naming the file and the problem.

Images that are not 8-bit RGB (grayscale, 16-bit, palette, CMYK, RGBA...) are *not* bad: they
are converted to RGB, transparent pixels composited on white (see :func:`to_rgb`).

Also here: :class:`ProcessLocalRandom`, the seeded generator the data sets and the augmentation
use so that results are reproducible and DataLoader workers do not repeat each other, and
:class:`CheckedImageCaptionList`, the map-style base that applies the policy at read time.
"""

from __future__ import annotations

import io
import logging
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_LISTED = 5  # how many bad files a warning names before it says "..."


class BadSample(Exception):
    """Raised by the checks below; ``str(exc)`` is the reason, e.g. 'caption file is empty'."""


# ----------------------------------------------------------------------------- images


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Return ``image`` as 8-bit RGB.

    Transparency (RGBA, LA, PA, palette or L/RGB with a transparent colour) is composited on white,
    because black-on-transparent artwork (icons, emoji) would vanish on a black background.
    16-bit and 32-bit grayscale is rescaled to 0..255 rather than clipped (PIL's plain
    ``convert`` would turn almost every 16-bit pixel white).
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    logger.debug("converting %s from mode %s to RGB", name, mode)
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = Image.fromarray(_rescale_to_uint8(np.asarray(image), mode), mode="L")
        mode = "L"
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or "transparency" in image.info
        or (mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadSample(f"cannot convert image mode {mode!r} to RGB ({exc})") from exc


def _rescale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    if mode.startswith("I;16"):
        scale = 65535.0  # 16-bit container: full range is 0..65535
    elif mode == "F" and pixels.max(initial=0.0) <= 1.0:
        scale = 1.0  # float images in [0, 1]
    else:
        peak = pixels.max(initial=0.0)  # 32-bit int / other floats: the range is unknown
        scale = 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
    return np.clip(np.round(pixels / scale * 255.0), 0, 255).astype(np.uint8)


def check_image_header(path: str | os.PathLike) -> None:
    """Cheap check at construction time: the file opens as an image and passes ``verify()``.

    ``verify`` reads a JPEG's header only (about 0.1 ms) and checks a PNG's chunk CRCs; a
    truncated JPEG body still passes and is caught by :func:`decode_image` at read time.
    """
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types: OSError, SyntaxError, struct.error, ...
        raise BadSample(f"cannot read image ({_describe_pil_error(exc)})") from exc


def decode_image(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Fully decode an image (path or encoded bytes), apply its EXIF rotation, return RGB.

    Raises :class:`BadSample` if the data is not a decodable image.
    """
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(fileobj) as image:
            image.load()  # forces the full decode: truncated data fails here
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    except Exception as exc:
        raise BadSample(f"cannot decode image ({_describe_pil_error(exc)})") from exc
    return to_rgb(image, name)


def _describe_pil_error(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its text repeats the path or a BytesIO repr
        return "not a recognised image format, or the file is empty"
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- captions


def parse_captions(raw: bytes) -> list[str]:
    """One caption per line; surrounding whitespace stripped, blank lines dropped.

    Raises :class:`BadSample` if the bytes are not UTF-8 or hold no caption.
    """
    try:
        text = raw.decode("utf-8-sig")  # -sig: editors on Windows prepend a BOM
    except UnicodeDecodeError as exc:
        raise BadSample(f"caption file is not UTF-8 text ({exc})") from exc
    captions = [line.strip() for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise BadSample("caption file is empty (no non-blank line)")
    return captions


def read_captions(path: Path) -> list[str]:
    """Read a caption file; see :func:`parse_captions`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadSample(f"cannot read caption file {path.name} ({exc})") from exc
    return parse_captions(raw)


# ----------------------------------------------------------------------------- the policy


class BadSampleReport:
    """Collects bad samples for one data set; raises at once when strict, else warns once.

    ``source`` names the data set in messages, e.g. ``"ImageCaptionFolder('/data/pets')"``.
    """

    def __init__(self, source: str, strict: bool):
        self.source = source
        self.strict = strict
        self.bad: list[tuple[str, str]] = []  # (file name, reason)

    def add(self, name: str, reason: str) -> None:
        if self.strict:
            raise ValueError(
                f"{self.source}: {name}: {reason} (strict=True; pass strict=False to skip bad samples)"
            )
        self.bad.append((name, reason))

    def __len__(self) -> int:
        return len(self.bad)

    def summary(self, total: int) -> str:
        listed = "; ".join(f"{name} ({reason})" for name, reason in self.bad[:MAX_LISTED])
        more = f"; ... and {len(self.bad) - MAX_LISTED} more" if len(self.bad) > MAX_LISTED else ""
        return f"{self.source}: skipped {len(self.bad)} bad of {total} samples: {listed}{more}"

    def warn_if_any(self, total: int, stacklevel: int = 3) -> None:
        if self.bad:
            warnings.warn(self.summary(total), UserWarning, stacklevel=stacklevel)


# ----------------------------------------------------------------------------- randomness


class ProcessLocalRandom:
    """A ``random.Random`` per process, reproducible from ``seed`` and safe under DataLoader workers.

    A generator created in the main process would be copied into every forked worker, and all
    workers would then draw the same numbers. So the generator is (re)created lazily in each
    process: in the main process from ``seed`` alone; in a DataLoader worker from ``seed`` and the
    worker's torch seed (``base_seed + worker_id``, which differs per worker and per epoch and is
    itself reproducible when torch is seeded, e.g. by ``lightning.seed_everything``).
    ``seed=None`` means fresh OS entropy in the main process.
    """

    def __init__(self, seed: int | None):
        self.seed = seed
        self._owner: tuple[int, int | None] | None = None
        self._rng: random.Random | None = None

    def get(self) -> random.Random:
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._rng is None or owner != self._owner:
            if info is None:
                self._rng = random.Random(self.seed)
            else:
                self._rng = random.Random(f"{self.seed}:{info.seed}")  # str seeds hash via sha512
            self._owner = owner
        return self._rng

    def __getstate__(self) -> dict:
        # Pickled into spawn-started workers: drop the generator so the worker makes its own.
        return {"seed": self.seed, "_owner": None, "_rng": None}


# ----------------------------------------------------------------------------- map-style base


class CheckedImageCaptionList(Dataset):
    """Base of the map-style sets: checked (image path, captions) pairs plus the read-time policy.

    Subclasses fill the lists in ``__init__`` and call ``_set_pairs``. A full decode failure in
    ``__getitem__`` (e.g. a truncated JPEG body, which passes the cheap header check) raises
    ``ValueError`` when strict; otherwise it warns naming the file, remembers the item as bad, and
    returns the next good item (``i+1``, ``i+2``, ... wrapping around), so an index always maps to
    the same substitute.
    """

    source: str  # names the data set in messages

    def _set_pairs(
        self,
        images: list[Path],
        captions: list[list[str]],
        names: list[str],
        transform: Callable[[Image.Image], Any] | None,
        strict: bool,
        seed: int | None,
        skipped: list[tuple[str, str]],
    ) -> None:
        self.images, self._captions, self._names = images, captions, names
        self.transform, self.strict = transform, strict
        self.skipped = skipped  # (name, reason) of every bad sample found so far
        self._rng = ProcessLocalRandom(seed)
        self._undecodable: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, index: int) -> list[str]:
        """All captions of item ``index``, in file order."""
        return list(self._captions[index])

    def __getitem__(self, index: int) -> tuple[Any, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range for {len(self)} items")
        index %= len(self)
        image, index = self._decode_or_substitute(index)
        caption = self._rng.get().choice(self._captions[index])
        return (self.transform(image) if self.transform is not None else image), caption

    def _decode_or_substitute(self, index: int) -> tuple[Image.Image, int]:
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._undecodable:
                continue
            name = self._names[candidate]
            try:
                return decode_image(self.images[candidate], name), candidate
            except BadSample as exc:
                message = f"{self.source}: {name}: {exc}"
                if self.strict:
                    raise ValueError(message + " (strict=True)") from exc
                self._undecodable.add(candidate)
                self.skipped.append((name, str(exc)))
                warnings.warn(
                    f"{message}; skipped, the next good item is returned instead "
                    f"({len(self._undecodable)} undecodable so far in this process)",
                    UserWarning,
                    stacklevel=4,
                )
        raise ValueError(f"{self.source}: none of the {len(self)} images decodes")

    def __repr__(self) -> str:
        return f"{self.source}: {len(self)} items, {len(self.skipped)} skipped"
