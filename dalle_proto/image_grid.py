"""One PIL image from many: the sample grids of every stage (image tokenizer reconstructions,
transformer samples, notebooks), optionally with each caption written under its image.

    grid = make_image_grid(images, captions=["a red circle", "two blue stars"], columns=4)
    grid.save("samples.png")

`images` is a float tensor (B, 3, H, W) in [-1, 1] (the project's image convention), a list of
such (3, H, W) tensors, or a list of PIL images; all of one size. Small images are scaled up
(nearest neighbour, an integer factor) to at least `min_side` pixels so that the pixels stay visible
and a caption has room to wrap.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

ImagesLike = torch.Tensor | Sequence[torch.Tensor] | Sequence[Image.Image]


def to_pil_images(images: ImagesLike) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1], a list of (3, H, W) tensors, or PIL images -> list of RGB PIL images."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a (B, 3, H, W) tensor in [-1, 1], got shape {tuple(images.shape)}")
        images = list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            out.append(image.convert("RGB"))
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images[{i}]: expected a (3, H, W) tensor in [-1, 1], got shape "
                                 f"{tuple(image.shape)}")
            pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()  # (3, H, W) in 0..255
            out.append(Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB"))
        else:
            raise TypeError(f"images[{i}]: expected a torch.Tensor or PIL.Image.Image, got {type(image).__name__}")
    return out


def make_image_grid(images: ImagesLike, captions: Sequence[str] | None = None, *, columns: int | None = None,
                    padding: int = 4, min_side: int = 128, font_size: int = 12,
                    background: tuple[int, int, int] = (255, 255, 255),
                    text_color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Tile `images` row by row into one RGB image; caption i (word-wrapped) goes under image i.

    columns: images per row (default: about a square grid). padding: pixels between cells and at the
    border. min_side: scale images up by an integer factor until their shorter side is at least this
    (0 keeps the original pixels).
    """
    pils = to_pil_images(images)
    if not pils:
        raise ValueError("make_image_grid: got no images")
    sizes = {p.size for p in pils}
    if len(sizes) != 1:
        raise ValueError(f"make_image_grid: images must share one size, got sizes {sorted(sizes)}")
    if captions is not None and len(captions) != len(pils):
        raise ValueError(f"make_image_grid: got {len(captions)} captions for {len(pils)} images")
    if columns is not None and columns < 1:
        raise ValueError(f"make_image_grid: columns must be >= 1, got {columns}")

    width, height = pils[0].size
    scale = max(1, math.ceil(min_side / min(width, height))) if min_side > 0 else 1
    if scale > 1:
        width, height = width * scale, height * scale
        pils = [p.resize((width, height), Image.NEAREST) for p in pils]
    columns = min(columns or math.ceil(math.sqrt(len(pils))), len(pils))
    rows = math.ceil(len(pils) / columns)

    font = ImageFont.load_default(size=font_size)
    wrapped = [_wrap(c, font, width) for c in captions] if captions is not None else None
    line_height = font_size + 2
    caption_height = max(len(lines) for lines in wrapped) * line_height + padding if wrapped else 0
    cell_w, cell_h = width + padding, height + caption_height + padding

    grid = Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), background)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(pils):
        x = padding + (i % columns) * cell_w
        y = padding + (i // columns) * cell_h
        grid.paste(image, (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + height + padding // 2 + j * line_height), line, fill=text_color, font=font)
    return grid


def _wrap(caption: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is cut by characters."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r:.80}")
    lines: list[str] = []
    current = ""
    for word in caption.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width and len(word) > 1:  # cut an over-long word
            cut = 1
            while cut < len(word) - 1 and font.getlength(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]
