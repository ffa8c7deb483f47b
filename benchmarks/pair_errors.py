"""What goes wrong when a model draws a pair: one sample per pair prompt, sorted into kinds of error.

    python benchmarks/pair_errors.py --checkpoint checkpoints/shapes --n 100 --seed 1

Prompts are the pair prompts of `dalle-proto evaluate`'s prompt set for `--seed` (use a seed other
than the report's 0 when choosing between models), sampled exactly as `evaluate` does (batch b uses
seed + b, the model's pipeline.json settings unless overridden). Each image's detected objects
(`shapes_detection`) put it in the first matching kind:
- `objects != 2`: no object, one, or three and more;
- `both right`: the two objects are the caption's two colour-shape pairs (relation not checked);
- `exchanged`: the caption's colours and shapes, bound the other way (a red square and a blue circle
  for "a red circle ... a blue square");
- `colour copied`: both objects have one colour although the caption names two;
- `shape copied`: both objects have one shape although the caption names two;
- `other`: anything else (a colour or shape not in the caption, ...).
Last line: one JSON object with the shares.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dalle_proto.datasets.shapes_grammar import parse_caption  # noqa: E402
from dalle_proto.evaluation import prompt_set, sample_prompts  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.shapes_detection import detect_objects_batch  # noqa: E402

KINDS = ("both right", "exchanged", "colour copied", "shape copied", "objects != 2", "other")


def classify(caption: str, objects: list) -> str:
    """The kind of one pair image (module docstring)."""
    wanted = [(o["color"], o["shape"]) for o in parse_caption(caption)["objects"]]
    if len(objects) != 2:
        return "objects != 2"
    drawn = sorted((o.color, o.shape) for o in objects)
    if drawn == sorted(wanted):
        return "both right"
    (c1, s1), (c2, s2) = wanted
    if drawn == sorted([(c1, s2), (c2, s1)]):
        return "exchanged"
    if c1 != c2 and drawn[0][0] == drawn[1][0]:
        return "colour copied"
    if s1 != s2 and drawn[0][1] == drawn[1][1]:
        return "shape copied"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model folder")
    parser.add_argument("--n", type=int, default=100, help="pair prompts (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's pipeline.json")
    args = parser.parse_args()
    pipe = DallePipeline.from_pretrained(args.checkpoint, device="cpu")
    if args.temperature is not None:
        pipe.config.temperature = args.temperature
    captions = [p.caption for p in prompt_set(args.n, args.seed) if p.category == "pair"]
    images = sample_prompts(pipe, captions, args.seed, args.batch_size, rerank=None, cfg_scale=None, desc="pairs")
    detected = detect_objects_batch(images)  # (N, 3, H, W) in [-1, 1]
    kinds = Counter(classify(c, objects) for c, objects in zip(captions, detected))
    shares = {kind: round(kinds[kind] / len(captions), 3) for kind in KINDS}
    for kind in KINDS:
        print(f"{kind:>14}: {shares[kind]:6.1%}")
    print(json.dumps({"checkpoint": args.checkpoint, "n": len(captions), "seed": args.seed,
                      "sampling": vars(pipe.config), **shares}))


if __name__ == "__main__":
    main()
