"""DalleImageAugmentation: the paper's near-centre crop, random resize and random crop."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dalle_proto.datasets.augmentation import DalleImageAugmentation, pil_to_tensor


def coordinate_image(width: int, height: int) -> Image.Image:
    """Each pixel stores its own (x, y) for x, y < 4096: R = x % 256, G = y % 256, B = high nibbles."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    pixels = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def decode_xy(tensor: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = torch.round((tensor + 1) * 127.5).to(torch.int64).numpy()  # 3 x (H, W)
    return r + 256 * (b // 16), g + 256 * (b % 16)


def test_output_shape_dtype_and_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = DalleImageAugmentation(32, seed=0)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.5 and out.max() > 0.5  # uses the whole range, not e.g. [0, 1]
    assert torch.equal(pil_to_tensor(Image.new("RGB", (2, 1), (0, 0, 0))), -torch.ones(3, 1, 2))
    assert torch.equal(pil_to_tensor(Image.new("RGB", (1, 1), (255, 255, 255))), torch.ones(3, 1, 1))


@pytest.mark.parametrize("width,height", [(1000, 100), (100, 1000)])
def test_square_offset_is_between_three_and_five_eighths_of_the_excess(width, height):
    # s = 100 = size, so t = size and the output is exactly the near-centre square, unresized.
    augment = DalleImageAugmentation(100, seed=1)
    image = coordinate_image(width, height)
    offsets = []
    for _ in range(40):
        xs, ys = decode_xy(augment(image))
        along, across = (xs, ys) if width > height else (ys, xs)
        offset = int(along.min())
        offsets.append(offset)
        assert np.array_equal(np.unique(along), np.arange(offset, offset + 100))
        assert np.array_equal(np.unique(across), np.arange(100))  # the short side is kept whole
    excess = 900
    assert min(offsets) >= np.floor(3 / 8 * excess) and max(offsets) <= np.ceil(5 / 8 * excess)
    assert len(set(offsets)) > 10  # it is random, not always the centre
    assert max(offsets) - min(offsets) > excess / 8


def test_resized_side_range_and_random_crop():
    augment = DalleImageAugmentation(64, seed=2)
    plans = [augment.plan(300, 200) for _ in range(300)]
    sides = {p.resized_side for p in plans}
    assert min(sides) == 64 and max(sides) == 72  # [size, min(s, round(9/8 * size))]
    for p in plans:
        assert p.square_box[3] - p.square_box[1] == 200 and p.square_box[2] - p.square_box[0] == 200
        assert 0 <= p.crop_xy[0] <= p.resized_side - 64 and 0 <= p.crop_xy[1] <= p.resized_side - 64
    assert len({p.crop_xy for p in plans}) > 10
    # s between size and 9/8 size caps t at s.
    assert max(augment.plan(66, 80).resized_side for _ in range(100)) == 66


def test_small_image_is_upscaled_to_exactly_size():
    augment = DalleImageAugmentation(32, seed=0)
    plan = augment.plan(10, 20)
    assert plan.resized_side == 32 and plan.crop_xy == (0, 0)
    out = augment(Image.new("RGB", (10, 20), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[0], torch.ones(32, 32)) and torch.allclose(out[1], -torch.ones(32, 32))


def test_same_seed_same_sequence_different_seed_differs():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    first = DalleImageAugmentation(64, seed=7)(image)
    a, b = DalleImageAugmentation(64, seed=7), DalleImageAugmentation(64, seed=7)
    seq_a = [a(image) for _ in range(5)]
    seq_b = [b(image) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert torch.equal(first, seq_a[0])
    assert not all(torch.equal(seq_a[0], x) for x in seq_a[1:])  # successive calls draw anew
    c = DalleImageAugmentation(64, seed=8)
    assert not all(torch.equal(x, c(image)) for x in seq_a)


def test_eval_mode_is_a_deterministic_centre_crop():
    augment = DalleImageAugmentation(100, train=False, seed=None)
    image = coordinate_image(300, 100)
    outs = [augment(image) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs)
    xs, ys = decode_xy(outs[0])
    assert xs[0, 0] == 100 and xs[0, -1] == 199  # the centre third of 300 columns
    assert ys[0, 0] == 0 and ys[-1, 0] == 99


@pytest.mark.parametrize("train", [True, False])
def test_a_circle_stays_round_on_a_wide_and_a_tall_image(train):
    for size in [(600, 300), (300, 600)]:
        image = Image.new("RGB", size, "white")
        cx, cy = size[0] // 2, size[1] // 2
        ImageDraw.Draw(image).ellipse((cx - 100, cy - 100, cx + 100, cy + 100), fill="black")
        out = DalleImageAugmentation(64, train=train, seed=0)(image)  # s = 300 >> 64: shrink then crop
        dark = (out.mean(0) < 0).numpy()
        rows, cols = np.nonzero(dark)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert abs(height - width) <= 1, (size, height, width)  # a squash would give 2:1
        assert 38 <= width <= 50  # diameter 200 of a 300 square, resized to t in [64, 72]


def test_grayscale_rgba_palette_and_16bit_inputs():
    augment = DalleImageAugmentation(16, seed=0)
    gray = augment(Image.new("L", (20, 30), 0))
    assert gray.shape == (3, 16, 16) and torch.equal(gray, -torch.ones(3, 16, 16))
    clear = augment(Image.new("RGBA", (30, 20), (0, 0, 0, 0)))
    assert torch.equal(clear, torch.ones(3, 16, 16))  # transparent -> white, not black
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    out = augment(palette)
    assert torch.allclose(out[2], torch.ones(16, 16)) and torch.allclose(out[0], -torch.ones(16, 16))
    deep = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert abs(augment(deep).mean().item()) < 0.02  # clipping would give white (1.0)


def test_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        DalleImageAugmentation(0)
