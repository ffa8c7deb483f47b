"""The README's first command, scored: how many of its 8 images match the caption, per seed.

    python benchmarks/first_command.py --checkpoint checkpoints/shapes --seeds 0 1 2

Samples exactly what `dalle-proto generate "a red circle to the left of a blue square"
--num-images 8 --seed S` draws (one sample per image, the model's pipeline.json settings), and
scores each image with the analytic shapes evaluator (whole caption: both objects' colour and shape,
the relation, nothing else drawn). Last line: one JSON object with the count right per seed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.shapes_evaluator import evaluate_each  # noqa: E402

CAPTION = "a red circle to the left of a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "shapes"), help="model folder")
    parser.add_argument("--caption", default=CAPTION)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rerank", type=int, default=None, help="candidates per image (default: one)")
    args = parser.parse_args()
    pipe = DallePipeline.from_pretrained(args.checkpoint)
    right = {}
    for seed in args.seeds:
        images = pipe(args.caption, num_images=args.num_images, seed=seed, rerank=args.rerank)
        results = evaluate_each(images, [args.caption] * len(images))
        right[str(seed)] = sum(r.correct for r in results)
        kinds = ["+".join(f"{o.color} {o.shape}" for o in r.objects) for r in results]
        print(f"seed {seed}: {right[str(seed)]} of {len(images)} right; drawn: {kinds}")
    print(json.dumps({"checkpoint": args.checkpoint, "caption": args.caption, "num_images": args.num_images,
                      "rerank": args.rerank, "right_per_seed": right}))


if __name__ == "__main__":
    main()
