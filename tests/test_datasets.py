"""Image–caption loaders on small data sets the tests write themselves: folder, COCO JSON, tar shards."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_proto.datasets.augmentation import DalleImageAugmentation
from dalle_proto.datasets.coco import CocoCaptions
from dalle_proto.datasets.image_caption_folder import ImageCaptionFolder
from dalle_proto.datasets.webdataset_shards import WebDatasetShards

MULTI_CAPTIONS = ["a red square", "a scarlet block", "something red"]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    # Noise makes a long entropy-coded body; cutting it keeps the header valid, so only a full decode fails.
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3)))
    data = encode(noise, "JPEG")
    return data[: len(data) // 2]


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 0  # index 0 (black) is transparent -> should become white
    return image


# name -> (image bytes, caption file text or None for no caption file); the good ones first.
GOOD = {
    "red.jpg": (encode(Image.new("RGB", (12, 10), (255, 0, 0)), "JPEG"), "\n".join(MULTI_CAPTIONS) + "\n\n"),
    "sub/deeper/green.png": (encode(Image.new("RGB", (8, 8), (0, 255, 0)), "PNG"), "a green square\n"),
    "blue.webp": (encode(Image.new("RGB", (8, 8), (0, 0, 255)), "WEBP"), "a blue square"),
    "upper.PNG": (encode(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG"), "upper case extension"),
    "gray.png": (encode(Image.new("L", (8, 8), 77), "PNG"), "a gray square"),
    "clear.png": (encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), "a transparent square"),
    "palette.png": (encode(palette_with_transparency(), "PNG"), "a palette square"),
    "cmyk.jpg": (encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), "a cmyk square"),
    "deep.png": (encode(Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)), "PNG"), "a 16-bit square"),
}
BAD = {
    "nocaption.jpg": (GOOD["red.jpg"][0], None),
    "sub/empty.png": (GOOD["sub/deeper/green.png"][0], "  \n\n \n"),
    "corrupt.png": (b"this is not an image", "corrupt"),
    "cut.png": (GOOD["gray.png"][0][:40], "cut short"),
}


def write_folder(root: Path, items: dict) -> None:
    for name, (data, caption) in items.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)


def check_good_items(dataset) -> None:
    by_caption = {dataset.captions(i)[0]: i for i in range(len(dataset))}
    assert set(by_caption) == GOOD_FIRST_CAPTIONS
    for i in range(len(dataset)):
        image, caption = dataset[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert caption in dataset.captions(i)
    assert dataset[by_caption["a gray square"]][0].getpixel((0, 0)) == (77, 77, 77)
    assert dataset[by_caption["a transparent square"]][0].getpixel((0, 0)) == (255, 255, 255)
    assert dataset[by_caption["a palette square"]][0].getpixel((0, 0)) == (255, 255, 255)
    assert min(dataset[by_caption["a cmyk square"]][0].getpixel((0, 0))) > 245  # no ink = white
    assert dataset[by_caption["a 16-bit square"]][0].getpixel((0, 0)) == (128, 128, 128)
    assert dataset.captions(by_caption[MULTI_CAPTIONS[0]]) == MULTI_CAPTIONS


GOOD_FIRST_CAPTIONS = {MULTI_CAPTIONS[0]} | {c.strip() for _, c in list(GOOD.values())[1:]}


def single_warning(record) -> str:
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    return messages[0]


# ----------------------------------------------------------------------------- folder


def test_folder_reads_nested_pairs_in_sorted_order(tmp_path):
    write_folder(tmp_path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean folder warns about nothing, not even conversions
        dataset = ImageCaptionFolder(tmp_path)
    assert len(dataset) == len(GOOD)
    names = [p.relative_to(tmp_path).as_posix() for p in dataset.images]
    assert names == sorted(GOOD)
    check_good_items(dataset)


def test_folder_multi_line_caption_yields_several_captions_reproducibly(tmp_path):
    write_folder(tmp_path, {"red.jpg": GOOD["red.jpg"]})
    dataset = ImageCaptionFolder(tmp_path, seed=3)
    drawn = [dataset[0][1] for _ in range(40)]
    assert set(drawn) <= set(MULTI_CAPTIONS) and len(set(drawn)) > 1
    assert [ImageCaptionFolder(tmp_path, seed=3)[0][1] for _ in range(1)] == drawn[:1]
    again = ImageCaptionFolder(tmp_path, seed=3)
    assert [again[0][1] for _ in range(40)] == drawn


def test_folder_skips_bad_pairs_with_one_warning_naming_them(tmp_path):
    write_folder(tmp_path, {**GOOD, **BAD})
    with pytest.warns(UserWarning) as record:
        dataset = ImageCaptionFolder(tmp_path)
    message = single_warning(record)
    assert f"skipped {len(BAD)} bad of {len(GOOD) + len(BAD)}" in message
    for name in BAD:
        assert name in message
    assert "no caption file nocaption.txt" in message and "empty" in message
    assert len(dataset) == len(GOOD)
    check_good_items(dataset)


@pytest.mark.parametrize("bad_name", list(BAD))
def test_folder_strict_raises_naming_the_file(tmp_path, bad_name):
    write_folder(tmp_path, {"red.jpg": GOOD["red.jpg"], bad_name: BAD[bad_name]})
    with pytest.raises(ValueError, match=bad_name):
        ImageCaptionFolder(tmp_path, strict=True)


def test_folder_truncated_jpeg_found_at_read_time(tmp_path):
    write_folder(tmp_path, {"a_cut.jpg": (truncated_jpeg(), "cut"), "b_red.jpg": GOOD["red.jpg"]})
    with pytest.raises(ValueError, match="a_cut.jpg"):
        ImageCaptionFolder(tmp_path, strict=True)[0]
    dataset = ImageCaptionFolder(tmp_path)
    with pytest.warns(UserWarning, match="a_cut.jpg"):
        image, caption = dataset[0]  # substituted by the next good item
    assert caption in MULTI_CAPTIONS and image.getpixel((0, 0))[0] > 200
    assert [name for name, _ in dataset.skipped] == ["a_cut.jpg"]


def test_folder_without_pairs_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageCaptionFolder(tmp_path)


def test_folder_transform_and_dataloader(tmp_path):
    write_folder(tmp_path, GOOD)
    dataset = ImageCaptionFolder(tmp_path, transform=DalleImageAugmentation(8, train=False))
    images, captions = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and len(captions) == 4


# ----------------------------------------------------------------------------- COCO


def write_coco(tmp_path: Path, items: dict, extra_annotations=()) -> Path:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images, annotations = [], list(extra_annotations)
    for image_id, (name, (data, caption)) in enumerate(items.items()):
        flat = name.replace("/", "_")
        (image_dir / flat).write_bytes(data)
        images.append({"id": image_id, "file_name": flat, "height": 8, "width": 8})
        for line in (caption or "").splitlines():  # blank lines become blank captions: dropped
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": line})
    images.append({"id": 999, "file_name": "missing.jpg"})
    annotations.append({"id": 10_000, "image_id": 999, "caption": "an image that is not there"})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_coco_reads_captions_grouped_per_image(tmp_path):
    good = {name.replace("/", "_"): item for name, item in GOOD.items()}
    path = write_coco(tmp_path, good)
    with pytest.warns(UserWarning) as record:
        dataset = CocoCaptions(path, tmp_path / "images")
    message = single_warning(record)
    assert "skipped 1 bad" in message and "missing.jpg" in message and "not found" in message
    check_good_items(dataset)
    red = next(i for i in range(len(dataset)) if dataset.captions(i) == MULTI_CAPTIONS)
    assert {dataset[red][1] for _ in range(40)} == set(MULTI_CAPTIONS)


def test_coco_bad_entries_warn_once_or_raise(tmp_path):
    items = {"red.jpg": GOOD["red.jpg"], **{n.replace("/", "_"): item for n, item in BAD.items()}}
    orphan = {"id": 5000, "image_id": 4242, "caption": "nobody's caption"}
    path = write_coco(tmp_path, items, extra_annotations=[orphan])
    with pytest.warns(UserWarning) as record:
        dataset = CocoCaptions(path, tmp_path / "images")
    message = single_warning(record)
    bad_names = ["annotations[0]", "corrupt.png", "cut.png", "missing.jpg", "nocaption.jpg", "sub_empty.png"]
    assert "skipped 6 bad of 7" in message and "and 1 more" in message  # lists the first five
    assert all(name in message for name in bad_names[:5]) and "unknown image_id 4242" in message
    assert sorted(name for name, _ in dataset.skipped) == bad_names and len(dataset) == 1
    with pytest.raises(ValueError, match=r"annotations\[0\].*4242"):
        CocoCaptions(path, tmp_path / "images", strict=True)


@pytest.mark.parametrize(
    "content,expected",
    [
        ({"annotations": []}, "'images'"),
        ({"images": []}, "'annotations'"),
        ({"images": [{"id": 1}], "annotations": []}, r"images\[0\] has no key 'file_name'"),
        ({"images": [], "annotations": [{"image_id": 1}]}, r"annotations\[0\] has no key 'caption'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_coco_malformed_json_names_file_and_key(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=expected) as info:
        CocoCaptions(path, tmp_path)
    assert "bad.json" in str(info.value)


# ----------------------------------------------------------------------------- shards


def write_shard(path: Path, items: dict) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, (data, caption) in items.items():
            stem, ext = name.rsplit(".", 1)
            files = [(name, data)] + ([(stem + ".txt", caption.encode())] if caption is not None else [])
            for member, payload in files:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_shards_read_brace_glob_and_list(tmp_path):
    names = list(GOOD)
    write_shard(tmp_path / "shard-0.tar", {n: GOOD[n] for n in names[:4]})
    write_shard(tmp_path / "shard-1.tar", {n: GOOD[n] for n in names[4:]})
    for urls in [
        f"{tmp_path}/shard-{{0..1}}.tar",
        f"{tmp_path}/shard-*.tar",
        [tmp_path / "shard-0.tar", str(tmp_path / "shard-1.tar")],
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            samples = list(WebDatasetShards(urls))
        assert len(samples) == len(GOOD)
        assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image, _ in samples)
        assert {caption for _, caption in samples[1:]} == GOOD_FIRST_CAPTIONS - {MULTI_CAPTIONS[0]}
    by_caption = {caption: image for image, caption in samples}
    assert by_caption["a transparent square"].getpixel((0, 0)) == (255, 255, 255)
    assert by_caption["a palette square"].getpixel((0, 0)) == (255, 255, 255)


def test_shards_multi_line_caption_and_seeded_shuffle(tmp_path):
    write_shard(tmp_path / "s.tar", {f"{i:03d}_{n.replace('/', '_')}": GOOD[n] for i, n in enumerate(GOOD)})
    dataset = WebDatasetShards(tmp_path / "s.tar", seed=1)
    captions = [c for _ in range(20) for _, c in dataset if c in MULTI_CAPTIONS]  # one per pass
    assert set(captions) == set(MULTI_CAPTIONS)

    def order(**kwargs) -> list[str]:  # the red item's caption varies; name it by colour
        dataset = WebDatasetShards(tmp_path / "s.tar", **kwargs)
        return ["red" if c in MULTI_CAPTIONS else c for _, c in dataset]

    assert order(seed=5, shuffle=4) == order(seed=5, shuffle=4)  # same seed, same order
    in_order = order(seed=5)
    assert in_order[0] == "red" and sorted(order(seed=5, shuffle=4)) == sorted(in_order)
    assert any(order(seed=seed, shuffle=4) != in_order for seed in range(5))


def test_shards_skip_bad_samples_with_one_warning_naming_shard_and_key(tmp_path):
    bad = {**BAD, "cutjpeg.jpg": (truncated_jpeg(), "cut jpeg")}
    write_shard(tmp_path / "good.tar", {"red.jpg": GOOD["red.jpg"]})
    write_shard(tmp_path / "mixed.tar", {"green.png": GOOD["sub/deeper/green.png"], **bad})
    dataset = WebDatasetShards([tmp_path / "good.tar", tmp_path / "mixed.tar"])
    with pytest.warns(UserWarning) as record:
        samples = list(dataset)
    message = single_warning(record)
    assert [c for _, c in samples][1] == "a green square" and len(samples) == 2
    assert f"skipped {len(bad)} bad of {len(bad) + 2}" in message
    for name in bad:
        assert f"mixed.tar:{name.rsplit('.', 1)[0]}" in message
    for name in bad:
        write_shard(tmp_path / "one.tar", {"red.jpg": GOOD["red.jpg"], name: bad[name]})
        with pytest.raises(ValueError, match=f"one.tar:{name.rsplit('.', 1)[0]}"):
            list(WebDatasetShards(tmp_path / "one.tar", strict=True))


def test_shards_truncated_tar_and_missing_files(tmp_path):
    full = write_shard(tmp_path / "full.tar", {"red.jpg": GOOD["red.jpg"], "blue.webp": GOOD["blue.webp"]})
    data = full.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])  # ends inside red.jpg's data
    with pytest.warns(UserWarning, match="cut.tar .cannot read tar"):
        samples = list(WebDatasetShards([tmp_path / "cut.tar", tmp_path / "full.tar"]))
    assert len(samples) == 2  # both from full.tar
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        WebDatasetShards([tmp_path / "nope.tar"])
    with pytest.raises(FileNotFoundError, match=r"\*.tgz"):
        WebDatasetShards(f"{tmp_path}/*.tgz")
    write_shard(tmp_path / "allbad.tar", {"corrupt.png": BAD["corrupt.png"]})
    with pytest.raises(ValueError, match="no usable"):
        list(WebDatasetShards(tmp_path / "allbad.tar"))


def test_dataloader_workers_draw_differently_but_reproducibly(tmp_path):
    write_folder(tmp_path / "folder", {"red.jpg": GOOD["red.jpg"]})
    dataset = ImageCaptionFolder(tmp_path / "folder", seed=0)
    dataset[0]  # the main process's generator must not leak into the workers

    def captions_via_workers() -> list[str]:
        torch.manual_seed(0)  # DataLoader worker seeds derive from torch's seed
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[0] * 60, num_workers=2)
        return [caption for _, caption in loader]

    first = captions_via_workers()
    assert first == captions_via_workers()
    assert first[0::2] != first[1::2]  # workers 0 and 1 alternate; a copied generator would repeat
    names = list(GOOD)
    write_shard(tmp_path / "a.tar", {n: GOOD[n] for n in names[:3]})
    write_shard(tmp_path / "b.tar", {n: GOOD[n] for n in names[3:]})
    shards = WebDatasetShards(f"{tmp_path}/{{a,b}}.tar", shuffle=2)
    loader = torch.utils.data.DataLoader(shards, batch_size=None, num_workers=2)
    assert len([caption for _, caption in loader]) == len(GOOD)  # each shard read by one worker
