"""Find the objects of a `shapes` image (spec: shared/SHAPES.md): colour, shape, size and box.

The images to read come from a generative model, so every step tolerates near-miss pixels:

1. Pixel colour. A rendered pixel is a blend of white and one palette colour, p = w + a (c - w),
   so each palette colour is a *line* from white. Every pixel is projected onto the 8 lines; its
   colour is the line it lies nearest to and its alpha `a` the position along that line. A pixel
   is foreground when a >= 0.53 (more than half covered), which keeps edges in place under blur
   and ignores faint background noise and JPEG ringing.
2. Objects. Connected foreground pixels form a blob of one colour, its pixels' majority, unless
   it holds two colour regions (touching objects; not mere pixel-by-pixel colour noise), where
   it is split. Specks below a fraction of the smallest
   shape's area are dropped. Each object then claims the faint pixels around it (a few steps of
   growth), so its soft alpha keeps the mass that blur or JPEG moved off its core. Labelling runs
   on the whole batch at once (vectorised union-find; no scipy).
3. Shape and box, by moments: blur and JPEG keep an object's alpha mass and centroid, while they
   wreck its outline (thin star tips fade first). For each shape hypothesis the mass gives the box
   side (mass / the shape's fill of its box) and the centroid the box corner; the alpha in that
   box (plus a margin) is resampled to a 20x20 grid and compared (soft IoU) with the shape rendered
   by the data set's own renderer (`shape_coverage`), sharp and blurred. The best match gives the
   shape and its box; size is small/large by box side vs 22 px (between 16 and 28) at S = 64.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from dalle_proto.datasets.shapes_grammar import CELL_TO_POSITION, COLORS, SHAPES, SIZE_PX_AT_64
from dalle_proto.datasets.shapes_render import nearest_grid_index, shape_coverage

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_DIRECTIONS = 255.0 - np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (8, 3) white -> colour
_DIR_NORM2 = (_DIRECTIONS**2).sum(axis=1)  # (8,)

# A pixel more than half covered by a colour is foreground. Not exactly 0.5: a render's pixels
# with 8 of 16 sub-samples covered land within +-0.005 of 0.5 depending on the colour's rounding.
FOREGROUND_ALPHA = 0.53
CORE_ALPHA = 0.75  # pixels this covered vote on an object's colour (edges are unreliable)
HALO_ALPHA = 0.05  # faint pixels an object may claim around its core
HALO_STEPS_AT_64 = 3  # how far (px at S = 64) an object claims faint pixels
MIN_AREA_AT_64 = 11  # specks under this many core pixels (15 % of a small star) are noise
SIGNIFICANT_COLOR_SHARE = 0.25  # a second colour with this share of a blob's votes splits it
SIZE_THRESHOLD_AT_64 = (SIZE_PX_AT_64["small"] + SIZE_PX_AT_64["large"]) / 2  # 22 px
GRID = 20  # side of the canonical grid that an object's box window is resampled to
MARGIN = 0.15  # the window is the box plus this fraction of its side on every edge
BLURS = (0.0, 0.05, 0.1)  # template blurs (Gaussian sigma) as fractions of the box side
_TEMPLATE_SIDE = 96  # box side of the fine renders that templates are cut from


@dataclass
class Detected:
    """One object found in an image; lengths are in pixels of the `size` px canvas."""
    color: str
    shape: str
    size: str  # "small" | "large"
    box: tuple[float, float, float, float]  # estimated square shape box x0, y0, x1, y1
    bbox: tuple[int, int, int, int]  # extent of the foreground pixels x0, y0, x1, y1 (exclusive)
    area: int  # foreground pixels (image pixels)
    centre: tuple[float, float]  # centre of `box`
    cell: tuple[int, int]  # (column, row) of the 3x3 grid cell nearest to `centre`
    position: str  # POSITIONS phrase of `cell`
    side: float  # side of `box`
    color_share: float  # share of the object's core pixels whose colour is `color`
    shape_score: float  # soft IoU with the best shape template (1.0 = perfect)


# ---------------------------------------------------------------- public API

def detect_objects(image, size: int | None = None) -> list[Detected]:
    """The objects of one image (PIL RGB, uint8 (H, W, 3) or float (3, H, W) in [-1, 1]).
    Lengths are given on a `size` px canvas (default: the image side)."""
    rgb = image_batch(image)  # (1, H, W, 3)
    if len(rgb) != 1:
        raise ValueError(f"detect_objects reads one image, got a batch of {len(rgb)}; "
                         "use detect_objects_batch")
    return _detect(rgb, size)[0]


def detect_objects_batch(images, size: int | None = None) -> list[list[Detected]]:
    """The objects of each image of a list or batch, all analysed at once (much faster)."""
    return _detect(image_batch(images), size)


def image_batch(images) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB from a PIL image or a list of them, uint8 arrays of shape (H, W, 3)
    or (B, H, W, 3), or float arrays/tensors of shape (3, H, W) or (B, 3, H, W) in [-1, 1] (the
    project's image tensor convention)."""
    if isinstance(images, Image.Image):
        return np.asarray(images.convert("RGB"))[None]  # (1, H, W, 3)
    if isinstance(images, (list, tuple)):
        if not images:
            return np.zeros((0, 1, 1, 3), dtype=np.uint8)
        batch = [image_batch(im) for im in images]
        if len({b.shape[1:] for b in batch}) > 1:
            raise ValueError(f"shapes images in one batch must share a size, got "
                             f"{sorted({b.shape[1:3] for b in batch})}")
        return np.concatenate(batch)
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    array = np.asarray(images)
    if array.dtype == np.uint8:
        array = array[None] if array.ndim == 3 else array
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"uint8 shapes images must be (H, W, 3) or (B, H, W, 3), got {array.shape}")
        return array
    if array.dtype.kind == "f":
        array = array[None] if array.ndim == 3 else array
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError("float shapes images must be (3, H, W) or (B, 3, H, W) in [-1, 1], "
                             f"got shape {array.shape}")
        rgb = np.round((np.clip(array, -1, 1) + 1) * 127.5).astype(np.uint8)  # (B, 3, H, W)
        return rgb.transpose(0, 2, 3, 1)  # (B, H, W, 3)
    raise ValueError(f"cannot read a shapes image from {type(images).__name__} of dtype "
                     f"{array.dtype}: expected PIL RGB, uint8 (H, W, 3) or float (3, H, W) in [-1, 1]")


# ---------------------------------------------------------------- pixels and objects

def classify_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Palette index (B, H, W) int64 and alpha along every colour's line (B, H, W, 8) float32 of
    (B, H, W, 3) uint8 RGB. Near-white pixels (alpha < 0.1 on every line) get colour 0, alpha 0."""
    flat = rgb.reshape(-1, 3)
    # alpha_k = t.d_k / |d_k|^2 <= |t| / |d_k| with t = white - pixel, so a pixel whose channels
    # are all within 14 of white cannot reach alpha 0.1 on any line: skip the (many) such pixels
    candidates = np.flatnonzero(flat.min(axis=1) < 241)
    t = 255.0 - flat[candidates].astype(np.float32)  # (n, 3) from white towards the pixel
    dots = t @ _DIRECTIONS.T  # (n, 8)
    alpha = np.maximum(dots / _DIR_NORM2, 0.0)  # (n, 8) position along each line
    # squared distance to each line: |t|^2 - 2 a t.d + a^2 |d|^2
    residual = (t**2).sum(-1, keepdims=True) - 2 * alpha * dots + alpha**2 * _DIR_NORM2  # (n, 8)
    color = np.zeros(len(flat), dtype=np.int64)
    alpha_all = np.zeros((len(flat), len(COLOR_NAMES)), dtype=np.float32)
    color[candidates], alpha_all[candidates] = residual.argmin(-1), alpha
    return color.reshape(rgb.shape[:3]), alpha_all.reshape(*rgb.shape[:3], len(COLOR_NAMES))


def _neighbour_pairs(mask: np.ndarray):
    """Flat indices (u, v) of every pair of 8-connected pixels that are both in the (B, H, W)
    mask, each pair once, never across images."""
    B, H, W = mask.shape
    flat = mask.reshape(-1)
    on = np.flatnonzero(flat)
    x = on % W
    tails, heads = [], []
    for step, x_ok in ((1, x < W - 1), (W - 1, x > 0), (W, True), (W + 1, x < W - 1)):
        j = on + step  # right, down-left, down, down-right
        ok = x_ok & (j < flat.size)
        ok &= j % (H * W) >= on % (H * W)  # j wrapped into the next image
        ok &= flat[np.minimum(j, flat.size - 1)]
        tails.append(on[ok])
        heads.append(j[ok])
    return np.concatenate(tails), np.concatenate(heads)


def _label_components(mask: np.ndarray, pairs, same: np.ndarray | None = None) -> np.ndarray:
    """8-connected components of a (B, H, W) bool mask, whose neighbour pairs (u, v) are given
    (`_neighbour_pairs`); with `same` (B, H, W), neighbours join only if their `same` values are
    equal. Returns int64 labels, each component's smallest flat
    pixel index, and -1 off the mask.

    Union-find without Python loops over pixels: each round hooks the larger root of every edge
    onto the smaller one, then pointer jumping flattens the trees; a few rounds suffice."""
    u, v = pairs
    if same is not None:
        keep = same.reshape(-1)[u] == same.reshape(-1)[v]
        u, v = u[keep], v[keep]
    on = np.flatnonzero(mask.reshape(-1))
    local = np.zeros(mask.size, dtype=np.int64)
    local[on] = np.arange(len(on))  # flat pixel index -> position in `on`
    u, v = local[u], local[v]
    parent = np.arange(len(on), dtype=np.int64)  # parent[i] <= i: roots are component minima
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        u, v, pu, pv = u[differ], v[differ], pu[differ], pv[differ]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:  # pointer jumping until every pixel points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    labels = np.full(mask.size, -1, dtype=np.int64)
    labels[on] = on[parent]
    return labels.reshape(mask.shape)


def _blob_colors(blobs: np.ndarray, color: np.ndarray, alpha: np.ndarray, pairs) -> np.ndarray:
    """Colour map with one colour per blob, unless a blob holds two objects of different colours.

    A blob is split when its second colour has >= 25 % of the core votes AND forms regions rather
    than speckle: the neighbour pairs of differing colour number less than the smaller colour's
    pixels (two touching objects meet along a line; a colour at the border of two palette
    entries flips pixel by pixel, with differing neighbours all around). Then each pixel keeps
    its colour if significant, else takes the majority; unsplit blobs take the majority colour."""
    n = len(COLOR_NAMES)
    on = np.flatnonzero(blobs.reshape(-1) >= 0)
    _, blob_index = np.unique(blobs.reshape(-1)[on], return_inverse=True)
    count = blob_index.max(initial=-1) + 1
    pixel_color = color.reshape(-1)[on]
    weight = np.where(alpha.reshape(-1)[on] >= CORE_ALPHA, 1.0, 1e-3)  # edges vote only when nothing else does
    votes = np.bincount(blob_index * n + pixel_color, weights=weight, minlength=count * n).reshape(-1, n)
    pixels = np.bincount(blob_index * n + pixel_color, minlength=count * n).reshape(-1, n)  # (blobs, 8)
    blob_of = np.zeros(blobs.size, dtype=np.int64)
    blob_of[on] = blob_index
    u, v = pairs
    flat_color = color.reshape(-1)
    mixed = np.bincount(blob_of[u[flat_color[u] != flat_color[v]]], minlength=count)  # (blobs,)
    ranked = np.argsort(-votes, axis=1)  # (blobs, 8)
    first, second = ranked[:, 0], ranked[:, 1]
    rows = np.arange(count)
    smaller = np.minimum(pixels[rows, first], pixels[rows, second])
    split = (votes[rows, second] >= SIGNIFICANT_COLOR_SHARE * votes.sum(axis=1)) & (mixed < smaller)
    significant = votes >= SIGNIFICANT_COLOR_SHARE * votes.sum(axis=1, keepdims=True)
    keep = split[blob_index] & significant[blob_index, pixel_color]
    smoothed = color.copy().reshape(-1)
    smoothed[on] = np.where(keep, pixel_color, first[blob_index])
    return smoothed.reshape(color.shape)


def _grow(labels: np.ndarray, claimable: np.ndarray, steps: int) -> np.ndarray:
    """Labels grown `steps` times into adjacent (8-connected) claimable unlabelled pixels; the
    smaller label wins a pixel that two objects reach at once."""
    B, H, W = labels.shape
    big = np.iinfo(np.int64).max
    padded = np.pad(np.where(labels >= 0, labels, big), ((0, 0), (1, 1), (1, 1)), constant_values=big)
    flat = padded.reshape(-1)  # a 1-pixel border of `big` makes neighbour offsets safe
    open_ = np.pad(claimable & (labels < 0), ((0, 0), (1, 1), (1, 1)))
    todo = np.flatnonzero(open_.reshape(-1))
    offsets = [dy * (W + 2) + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for _ in range(steps):
        reach = np.full(len(todo), big)
        for offset in offsets:
            np.minimum(reach, flat[todo + offset], out=reach)
        taken = reach != big
        flat[todo[taken]] = reach[taken]
        todo = todo[~taken]
    grown = flat.reshape(B, H + 2, W + 2)[:, 1:-1, 1:-1]
    return np.where(grown == big, -1, grown)


def _detect(rgb: np.ndarray, size: int | None) -> list[list[Detected]]:
    B, H, W, _ = rgb.shape
    if B == 0:
        return []
    if H != W:
        raise ValueError(f"shapes images must be square, got {W}x{H}")
    canvas = size or W
    scale = canvas / W  # canvas px per image px
    color, alpha_all = classify_pixels(rgb)  # (B, H, W), (B, H, W, 8)
    alpha = np.take_along_axis(alpha_all, color[..., None], -1)[..., 0]  # (B, H, W)
    foreground = alpha >= FOREGROUND_ALPHA
    pairs = _neighbour_pairs(foreground)
    color = _blob_colors(_label_components(foreground, pairs), color, alpha, pairs)
    labels = _label_components(foreground, pairs, same=color)  # (B, H, W)
    areas = np.bincount(labels[labels >= 0], minlength=1)  # indexed by label
    keep = areas >= MIN_AREA_AT_64 * (W / 64) ** 2
    labels = np.where((labels >= 0) & keep[np.maximum(labels, 0)], labels, -1)
    grown = _grow(labels, alpha >= HALO_ALPHA, max(1, round(HALO_STEPS_AT_64 * W / 64)))

    flat_grown, flat_color = grown.reshape(-1), color.reshape(-1)
    core = (alpha >= CORE_ALPHA).reshape(-1)
    on = np.flatnonzero(flat_grown >= 0)
    on = on[np.argsort(flat_grown[on], kind="stable")]
    ids, starts = np.unique(flat_grown[on], return_index=True)
    results: list[list[Detected]] = [[] for _ in range(B)]
    for label, pixels in zip(ids, np.split(on, starts[1:])):
        image_index, rest = divmod(pixels, H * W)
        ys, xs = divmod(rest, W)
        k = int(flat_color[label])  # the label is one of the object's own pixels
        own = labels.reshape(-1)[pixels] == label
        votes = np.bincount(flat_color[pixels[own & core[pixels]]], minlength=len(COLOR_NAMES))
        share = float(votes[k] / votes.sum()) if votes.sum() else 1.0
        gx0, gy0 = int(xs.min()), int(ys.min())
        crop = np.zeros((int(ys.max()) + 1 - gy0, int(xs.max()) + 1 - gx0), dtype=np.float32)
        crop[ys - gy0, xs - gx0] = np.clip(alpha_all.reshape(-1, len(COLOR_NAMES))[pixels, k], 0, 1)
        shape, score, (bx0, by0, bx1, by1) = match_shape(crop)
        box = ((bx0 + gx0) * scale, (by0 + gy0) * scale, (bx1 + gx0) * scale, (by1 + gy0) * scale)
        bbox = (xs[own].min(), ys[own].min(), xs[own].max() + 1, ys[own].max() + 1)
        results[int(image_index[0])].append(_detected(
            COLOR_NAMES[k], shape, box, tuple(int(round(v * scale)) for v in bbox),
            int(own.sum()), share, score, canvas))
    return results


def _detected(color, shape, box, bbox, area, share, score, canvas) -> Detected:
    x0, y0, x1, y1 = (float(v) for v in box)
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    side = ((x1 - x0) + (y1 - y0)) / 2
    cell = (nearest_grid_index(centre[0], canvas), nearest_grid_index(centre[1], canvas))
    small_large = "large" if side >= SIZE_THRESHOLD_AT_64 * canvas / 64 else "small"
    return Detected(color=color, shape=shape, size=small_large, box=(x0, y0, x1, y1), bbox=bbox,
                    area=area, centre=centre, cell=cell, position=CELL_TO_POSITION[cell], side=side,
                    color_share=share, shape_score=score)


# ---------------------------------------------------------------- shapes by template

def _window_weights(start: np.ndarray, stop: np.ndarray, length: int) -> np.ndarray:
    """(n, GRID, length) weights that average pixels 0..length-1 (zero beyond) over GRID equal
    cells spanning each of the n fractional pixel intervals [start, stop)."""
    fractions = np.linspace(0.0, 1.0, GRID + 1)
    edges = start[:, None] + (stop - start)[:, None] * fractions  # (n, GRID + 1)
    left, right = edges[:, :-1, None], edges[:, 1:, None]  # (n, GRID, 1)
    pixel = np.arange(length)  # (length,)
    overlap = np.clip(np.minimum(right, pixel + 1) - np.maximum(left, pixel), 0.0, None)  # (n, GRID, length)
    return (overlap / (right - left)).astype(np.float32)


def _windows(alpha: np.ndarray, x0: np.ndarray, y0: np.ndarray, side: np.ndarray) -> np.ndarray:
    """(n, GRID, GRID) mean alpha of each box [x0, x0 + side) x [y0, y0 + side) plus MARGIN."""
    pad = MARGIN * side
    h, w = alpha.shape
    rows = _window_weights(y0 - pad, y0 + side + pad, h)  # (n, GRID, h)
    cols = _window_weights(x0 - pad, x0 + side + pad, w)  # (n, GRID, w)
    return rows @ alpha @ cols.transpose(0, 2, 1)  # (n, GRID, GRID)


@lru_cache(maxsize=None)
def _shape_models() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per shape of SHAPES, from a fine render by the data set's renderer: fill of its box (6,),
    centroid x and y as fractions of the box side (6,) (6,), and templates (6, len(BLURS), GRID,
    GRID): the box window at each blur."""
    T = _TEMPLATE_SIDE
    pad = int(np.ceil(T * (MARGIN + 3 * max(BLURS)))) + 1
    fills, gxs, gys, templates = [], [], [], []
    for shape in SHAPES:
        coverage = shape_coverage(shape, T).astype(np.float64) / 16  # (T, T)
        mass = coverage.sum()
        centre = np.arange(T) + 0.5
        fills.append(mass / T**2)
        gxs.append((coverage.sum(0) @ centre) / mass / T)
        gys.append((coverage.sum(1) @ centre) / mass / T)
        canvas = np.pad(coverage, pad)
        blurred = np.stack([_gaussian_blur(canvas, blur * T) for blur in BLURS]).astype(np.float32)
        corner = np.full(1, float(pad))
        templates.append(np.stack([_windows(b, corner, corner, np.full(1, float(T)))[0] for b in blurred]))
    return np.array(fills), np.array(gxs), np.array(gys), np.stack(templates)


def _gaussian_blur(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero beyond its edges); sigma in pixels."""
    if sigma <= 0:
        return alpha
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.apply_along_axis(np.convolve, 1, alpha, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="same")


def match_shape(alpha: np.ndarray) -> tuple[str, float, tuple[float, float, float, float]]:
    """Best shape for the (h, w) soft alpha (in [0, 1]) of one object, and its box.

    Returns (shape, soft IoU with the best template, box x0, y0, x1, y1 in `alpha`'s pixels)."""
    mass = float(alpha.sum())
    if mass <= 0:
        raise ValueError("match_shape needs an object with some alpha, got an empty crop")
    h, w = alpha.shape
    cx = float(alpha.sum(0) @ (np.arange(w) + 0.5)) / mass  # centroid, in pixels
    cy = float(alpha.sum(1) @ (np.arange(h) + 0.5)) / mass
    fills, gxs, gys, templates = _shape_models()
    sides = np.sqrt(mass / fills)  # (6,) box side under each shape hypothesis
    x0, y0 = cx - gxs * sides, cy - gys * sides  # (6,)
    windows = _windows(alpha.astype(np.float32), x0, y0, sides)[:, None]  # (6, 1, GRID, GRID)
    overlap = np.minimum(windows, templates).sum(axis=(2, 3))  # (6, len(BLURS))
    union = np.maximum(windows, templates).sum(axis=(2, 3))
    scores = (overlap / np.maximum(union, 1e-6)).max(axis=1)  # (6,)
    best = int(scores.argmax())
    return SHAPES[best], float(scores[best]), (float(x0[best]), float(y0[best]),
                                               float(x0[best] + sides[best]), float(y0[best] + sides[best]))
