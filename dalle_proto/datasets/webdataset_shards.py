"""WebDataset tar shards: streaming image–caption data that is too big for a folder.

A shard is a plain tar file whose members are grouped into samples by their name up to the first
dot (the WebDataset convention)::

    shard-000000.tar:  0001.jpg 0001.txt 0002.png 0002.txt pets/0003.webp pets/0003.txt ...

Each sample needs one image (jpg/jpeg/png/webp, any case) and a ``txt`` with one caption per line.
Write shards with ``webdataset.TarWriter`` or Python's ``tarfile``.
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from dalle_proto.datasets.image_checks import (
    IMAGE_EXTENSIONS,
    BadSample,
    BadSampleReport,
    ProcessLocalRandom,
    decode_image,
    parse_captions,
)

_IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # ("jpg", "jpeg", "png", "webp")


class WebDatasetShards(IterableDataset):
    """Iterable data set over tar shards, read with the ``webdataset`` library.

    ``urls``: a brace pattern (``"data/shard-{000000..000009}.tar"``), a glob of local paths
    (``"data/*.tar"``), or a list of paths/URLs. Local paths are checked at construction.

    Yields ``(image, caption)``: a ``PIL.Image`` in RGB (non-RGB converted, transparency on white)
    and one of the sample's captions drawn at random, or ``(transform(image), caption)``.

    Bad samples (no ``txt``, empty caption, no image, undecodable image, unreadable tar) are skipped
    with ``strict=False`` and counted; ONE warning per pass (per DataLoader worker) lists the
    count and the first few as ``shard:key``. ``strict=True`` raises ``ValueError`` naming the
    shard and the key. A pass that yields no good sample at all raises ``ValueError``.

    ``shuffle=0`` reads shards and samples in order. ``shuffle=n > 0`` shuffles the order of the
    shards and keeps a buffer of ``n`` samples to shuffle across them (the usual WebDataset
    recipe). All randomness comes from ``seed`` (see ``ProcessLocalRandom``). Shards are split
    between distributed ranks and between DataLoader workers (``wds.split_by_node`` /
    ``wds.split_by_worker``), so give at least as many shards as ranks times workers.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str | os.PathLike],
        transform: Callable[[Image.Image], Any] | None = None,
        strict: bool = False,
        seed: int = 0,
        shuffle: int = 0,
    ):
        super().__init__()
        if shuffle < 0:
            raise ValueError(f"WebDatasetShards: shuffle must be >= 0 (a buffer size), got {shuffle}")
        self.urls = resolve_shard_urls(urls)
        self.transform = transform
        self.strict = strict
        self.shuffle = shuffle
        self._rng = ProcessLocalRandom(seed)

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        rng = self._rng.get()
        report = BadSampleReport(f"WebDatasetShards({self._describe()})", self.strict)
        assigned: list[str] = []  # shards this rank/worker reads in this pass

        def shard_order(shards: Iterator[dict]) -> Iterator[dict]:
            shards = list(shards)
            if self.shuffle > 0:
                rng.shuffle(shards)
            assigned.extend(shard["url"] for shard in shards)
            yield from shards

        def tar_error(exc: Exception) -> bool:
            # wds appends (stream, url) to the exception's args; the url names the shard.
            shard = next((a for a in reversed(exc.args) if isinstance(a, str) and a in assigned), "?")
            detail = exc.args[0] if exc.args else ""
            report.add(Path(shard).name, f"cannot read tar ({type(exc).__name__}: {detail})")
            return True  # carry on with the next shard (report.add has raised if strict)

        def read_shards(shards: Iterator[dict]) -> Iterator[dict]:
            # wds.tarfile_to_samples, except that each shard's file is closed once it is read
            # (wds leaves that to the garbage collector, which warns about unclosed files).
            def files() -> Iterator[dict]:
                for shard in wds.tariterators.url_opener(shards, handler=tar_error):
                    try:
                        yield from wds.tariterators.tar_file_expander([shard], handler=tar_error)
                    finally:
                        shard["stream"].close()

            return wds.tariterators.group_by_keys(files(), handler=tar_error)

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_node,
            wds.split_by_worker,
            shard_order,
            read_shards,
        )
        samples: Iterable[dict] = pipeline
        if self.shuffle > 0:
            samples = _buffer_shuffle(samples, self.shuffle, rng)

        good = 0
        for sample in samples:
            name = f"{Path(sample.get('__url__', '?')).name}:{sample.get('__key__', '?')}"
            try:
                image, captions = _decode_sample(sample, name)
            except BadSample as exc:
                report.add(name, str(exc))
                continue
            good += 1
            caption = rng.choice(captions)
            yield (self.transform(image) if self.transform is not None else image), caption

        if assigned and good == 0:
            detail = f": {report.summary(len(report))}" if len(report) else " (the shards are empty)"
            raise ValueError(f"WebDatasetShards: no usable image-caption sample in {assigned}{detail}")
        report.warn_if_any(total=good + len(report), stacklevel=3)

    def _describe(self) -> str:
        first = repr(self.urls[0])
        return first if len(self.urls) == 1 else f"{first} and {len(self.urls) - 1} more shards"

    def __repr__(self) -> str:
        return f"WebDatasetShards({self._describe()}, shuffle={self.shuffle})"


def resolve_shard_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a brace pattern, a glob or a list into shard URLs; local paths must exist."""
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        if any(ch in text for ch in "*?[") and "://" not in text and not text.startswith("pipe:"):
            expanded = sorted(glob.glob(os.path.expanduser(text)))
            if not expanded:
                raise FileNotFoundError(f"WebDatasetShards: the glob {text!r} matches no file")
        else:
            expanded = wds.shardlists.expand_urls(text)  # braces and "::"-joined lists
    else:
        expanded = [os.fspath(url) for url in urls]
    if not expanded:
        raise ValueError(f"WebDatasetShards: no shard given in {urls!r}")
    for url in expanded:
        is_remote = "://" in url or url.startswith("pipe:") or url == "-"
        if not is_remote and not os.path.isfile(url):
            raise FileNotFoundError(f"WebDatasetShards: shard {url!r} does not exist")
    return expanded


def _decode_sample(sample: dict, name: str) -> tuple[Image.Image, list[str]]:
    """The RGB image and caption list of one grouped sample; raises BadSample naming what is wrong."""
    image_suffixes = [s for s in _IMAGE_SUFFIXES if s in sample]
    if "txt" not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"no .txt caption in the sample (found {present})")
    if not image_suffixes:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"no .jpg/.jpeg/.png/.webp image in the sample (found {present})")
    captions = parse_captions(sample["txt"])
    return decode_image(sample[image_suffixes[0]], name), captions


def _buffer_shuffle(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``size`` samples (still encoded, so memory stays small)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer
