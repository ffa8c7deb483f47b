"""Pixel rendering of `shapes` scenes (spec: shared/SHAPES.md): geometry scaled to the canvas,
anti-aliased flat-colour shapes on white.

Anti-aliasing is exactly "draw at 4x, then BOX-downsample": each pixel of an object's box holds
4x4 sub-pixel samples; a sample is inside the shape or not (tested analytically at the sample's
centre), and the pixel is the white/colour blend weighted by the k/16 samples inside, rounded half
up in integer arithmetic. Boxes have integer pixel corners, so a shape's coverage only depends on
(shape, box side) and is cached; rendering a scene is then a few array writes. Integer maths makes
the pixels identical on every machine.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from dalle_proto.datasets.shapes_grammar import COLORS, SHAPES, SIZE_PX_AT_64

SUPERSAMPLE = 4  # sub-samples per pixel side ("draw at 4x")
WHITE = 255
MIN_SIZE = 16  # smallest canvas side: small shapes are then 4 px


def scaled_px(px_at_64: float, size: int) -> int:
    """A length given in pixels at a 64 px canvas, scaled to a `size` px canvas (rounded half up)."""
    return int(math.floor(px_at_64 * size / 64 + 0.5))


def box_side(size_name: str, size: int) -> int:
    if size_name not in SIZE_PX_AT_64:
        raise ValueError(f"object size {size_name!r} is not one of {tuple(SIZE_PX_AT_64)}")
    return scaled_px(SIZE_PX_AT_64[size_name], size)


def check_canvas_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE:
        raise ValueError(f"shapes canvas size must be an int >= {MIN_SIZE} px, got {size!r}")


def grid_centre(index: int, size: int) -> float:
    """Centre of grid column/row `index` (0, 1, 2): at 0.25, 0.5, 0.75 of the side."""
    return size * (index + 1) / 4


def nearest_grid_index(centre: float, size: int) -> int:
    """Grid column/row whose centre is nearest to `centre` (ties go to the lower index).

    This is the rule that assigns a 3x3 cell to any object, including pair and count objects,
    which are placed freely: the boundaries lie at 3/8 and 5/8 of the side.
    """
    distances = [abs(centre - grid_centre(i, size)) for i in range(3)]
    return distances.index(min(distances))


def cell_of_box(box, size: int) -> tuple[int, int]:
    """(column, row) of the grid cell whose centre is nearest to the centre of box [x0, y0, x1, y1]."""
    x0, y0, x1, y1 = box
    return nearest_grid_index((x0 + x1) / 2, size), nearest_grid_index((y0 + y1) / 2, size)


def _star_polygon() -> np.ndarray:
    # 10 vertices alternating outer radius 0.5 and inner radius 0.2, first one straight up
    # (image y points down, so -90 degrees is up).
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
    return np.stack([0.5 + radii * np.cos(angles), 0.5 + radii * np.sin(angles)], axis=1)  # (10, 2)


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside if a ray to +x crosses the outline an odd number of times."""
    inside = np.zeros(u.shape, dtype=bool)
    for (xa, ya), (xb, yb) in zip(polygon, np.roll(polygon, -1, axis=0)):
        spans = (ya > v) != (yb > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = xa + (v - ya) * (xb - xa) / (yb - ya)
        inside ^= spans & (u < x_cross)
    return inside


@lru_cache(maxsize=None)
def shape_coverage(shape: str, side: int) -> np.ndarray:
    """(side, side) uint8 array: how many of a pixel's 16 sub-samples lie inside `shape`.

    Sub-sample centres sit at u = X / N with X = 1, 3, 5, ... and N = 2 * 4 * side, so the
    tests of the straight-edged shapes are exact integer comparisons (no rounding at edges).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    n = SUPERSAMPLE * side
    N = 2 * n
    X = (2 * np.arange(n, dtype=np.int64) + 1)[None, :]  # (1, n) sub-sample x numerators
    Y = (2 * np.arange(n, dtype=np.int64) + 1)[:, None]  # (n, 1) sub-sample y numerators
    if shape == "circle":  # inscribed circle: |p - (0.5, 0.5)| <= 0.5
        inside = (2 * X - N) ** 2 + (2 * Y - N) ** 2 <= N * N
    elif shape == "square":
        inside = np.ones((n, n), dtype=bool)
    elif shape == "triangle":  # apex (0.5, 0), base from (0, 1) to (1, 1): |x - 0.5| <= y / 2
        inside = np.abs(2 * X - N) <= Y
    elif shape == "diamond":  # |x - 0.5| + |y - 0.5| <= 0.5
        inside = np.abs(2 * X - N) + np.abs(2 * Y - N) <= N
    elif shape == "cross":  # 1/3 <= x <= 2/3 or 1/3 <= y <= 2/3
        inside = ((N <= 3 * X) & (3 * X <= 2 * N)) | ((N <= 3 * Y) & (3 * Y <= 2 * N))
    else:  # star
        u, v = np.broadcast_arrays(X / N, Y / N)
        inside = _inside_polygon(u, v, _star_polygon())
    inside = np.broadcast_to(inside, (n, n))
    coverage = inside.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).sum(axis=(1, 3))  # (side, side)
    coverage = coverage.astype(np.uint8)
    coverage.flags.writeable = False  # cached and shared: nobody may modify it
    return coverage


@lru_cache(maxsize=None)
def blend_lut(color: str) -> np.ndarray:
    """(17, 3) uint8: the pixel value for k = 0..16 covered sub-samples of `color` on white."""
    if color not in COLORS:
        raise ValueError(f"colour {color!r} is not one of {tuple(COLORS)}")
    k = np.arange(SUPERSAMPLE**2 + 1, dtype=np.int64)[:, None]  # (17, 1)
    rgb = np.array(COLORS[color], dtype=np.int64)[None, :]  # (1, 3)
    total = SUPERSAMPLE**2
    lut = ((WHITE * (total - k) + rgb * k + total // 2) // total).astype(np.uint8)  # (17, 3)
    lut.flags.writeable = False
    return lut


def draw_objects(objects: list[dict], size: int) -> Image.Image:
    """RGB image of `objects` (dicts with color, shape, box [x0, y0, x1, y1]) on a white canvas.

    A box covers the pixels x0 <= x < x1, y0 <= y < y1; it must be square, lie inside the canvas
    and not overlap another box (scenes never overlap, so pixels need no compositing).
    """
    check_canvas_size(size)
    canvas = np.full((size, size, 3), WHITE, dtype=np.uint8)  # (H, W, 3)
    taken = np.zeros((size, size), dtype=bool)  # (H, W)
    for obj in objects:
        x0, y0, x1, y1 = (int(c) for c in obj["box"])
        side = x1 - x0
        if side <= 0 or y1 - y0 != side or x0 < 0 or y0 < 0 or x1 > size or y1 > size:
            raise ValueError(f"object box {obj['box']} must be a non-empty square inside the "
                             f"{size}x{size} canvas")
        if taken[y0:y1, x0:x1].any():
            raise ValueError(f"object box {obj['box']} overlaps another object's box")
        taken[y0:y1, x0:x1] = True
        coverage = shape_coverage(obj["shape"], side)  # (b, b)
        canvas[y0:y1, x0:x1] = blend_lut(obj["color"])[coverage]  # (b, b, 3)
    return Image.fromarray(canvas)  # uint8 (H, W, 3) -> RGB
