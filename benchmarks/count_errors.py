"""How many objects a model draws for a count prompt, against how many were asked: one sample each.

    python benchmarks/count_errors.py --checkpoint checkpoints/shapes --n 100 --seed 1 [--dtype float32]

Prompts are the count prompts of `dalle-proto evaluate`'s prompt set for `--seed` (use a seed other
than the report's 0 when choosing between models), sampled as `evaluate` samples them (batch b uses
seed + b, the model's pipeline.json settings), with the transformer's weights in `--dtype` (the
pipeline's default is bfloat16). Objects are found by `shapes_detection`, as the evaluator finds
them. Last line: one JSON object; "table" maps "asked->drawn" to the number of prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalle_proto.datasets.shapes_grammar import parse_caption  # noqa: E402
from dalle_proto.evaluation import prompt_set, sample_prompts  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.shapes_detection import detect_objects_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model folder")
    parser.add_argument("--n", type=int, default=100, help="count prompts (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    pipe = DallePipeline.from_pretrained(args.checkpoint, device="cpu", dtype=getattr(torch, args.dtype))
    captions = [p.caption for p in prompt_set(args.n, args.seed) if p.category == "count"]
    images = sample_prompts(pipe, captions, args.seed, args.batch_size, rerank=None, cfg_scale=None, desc="count")
    detected = detect_objects_batch(images)  # (N, 3, H, W) in [-1, 1]
    table = Counter((parse_caption(c)["number"], len(objects)) for c, objects in zip(captions, detected))
    wrong = sum(n for (asked, drawn), n in table.items() if asked != drawn)
    more = sum(n for (asked, drawn), n in table.items() if drawn > asked)
    for (asked, drawn), n in sorted(table.items()):
        print(f"asked {asked}, drawn {drawn}: {n}")
    print(json.dumps({"checkpoint": args.checkpoint, "n": len(captions), "seed": args.seed, "dtype": args.dtype,
                      "wrong_number": wrong, "too_many": more,
                      "table": {f"{a}->{d}": n for (a, d), n in sorted(table.items())}}))


if __name__ == "__main__":
    main()
