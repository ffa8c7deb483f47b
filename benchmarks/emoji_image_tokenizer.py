"""Reconstruction quality of an emoji image tokenizer over every OpenMoji emoji (needs `.[emoji]`).

    python3 benchmarks/emoji_image_tokenizer.py                          # checkpoints/emoji/image_tokenizer
    python3 benchmarks/emoji_image_tokenizer.py --model runs/emoji/image_tokenizer

Prints the mean per-image PSNR ([0, 1] scale) over all 3,953 named emoji at the tokenizer's
resolution, the number of codes their tokens use and the other figures of
`benchmarks/image_tokenizer.py`'s measurement. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.image_tokenizer import evaluate  # noqa: E402  (the shapes benchmark's measurement)
from dalle_proto.datasets.augmentation import pil_to_tensor  # noqa: E402
from dalle_proto.datasets.emoji import OpenMojiEmoji  # noqa: E402
from dalle_proto.image_tokenizer import ImageTokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "emoji" / "image_tokenizer"))
    args = parser.parse_args()
    model = ImageTokenizer.from_pretrained(args.model).float()
    data = OpenMojiEmoji(image_size=model.config.resolution)
    images = torch.stack([pil_to_tensor(data[i][0]) for i in range(len(data))])  # (N, 3, S, S)
    result = {**evaluate(model, images), "images": len(data)}
    result["psnr_db"] = round(result["psnr_db"], 2)
    print(f"PSNR {result['psnr_db']} dB over {len(data)} emoji; codes used {result['codes_used']}/{model.codebook_size}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
