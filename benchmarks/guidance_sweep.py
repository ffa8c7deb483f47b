"""Pick a shapes model's sampling defaults: whole-caption accuracy per guidance scale / temperature.

    python3 benchmarks/guidance_sweep.py --checkpoint runs/shapes
    python3 benchmarks/guidance_sweep.py --checkpoint checkpoints/shapes --cfg-scales 1 1.5 2 3 --temperatures 1 0.8

For each (cfg_scale, temperature) it samples one image per prompt of `evaluation.prompt_set` and
scores it with the shapes evaluator, exactly as `dalle-proto evaluate` does without reranking. The
prompts come from seed 1 by default, so the choice is not tuned on `dalle-proto evaluate`'s seed-0
prompt set. Write the winner into the model folder with
`dalle-proto export RUN OUT --cfg-scale S --temperature T`.

Prints one line per setting; last stdout line: one JSON object with every setting's accuracies
and the best setting by mean whole-caption accuracy over the four categories.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalle_proto.evaluation import CATEGORIES, accuracy_table, prompt_set, sample_prompts  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.shapes_evaluator import evaluate_each  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model folder, e.g. runs/shapes")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--per-category", type=int, default=50, help="prompts per category (default: 50)")
    parser.add_argument("--seed", type=int, default=1, help="prompt set and sampling seed (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    pipe = DallePipeline.from_pretrained(args.checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    prompts = prompt_set(args.per_category, args.seed)
    captions = [p.caption for p in prompts]
    settings = []
    for temperature in args.temperatures:
        for cfg_scale in args.cfg_scales:
            start = time.time()
            pipe.config.temperature = temperature
            images = sample_prompts(pipe, captions, args.seed, args.batch_size, None, cfg_scale,
                                    desc=f"cfg {cfg_scale} temperature {temperature}")
            table = accuracy_table(evaluate_each(images, captions), prompts)
            full = {c: table[c]["full"] for c in CATEGORIES}
            colour_shape = table["single"]["color_shape"]
            row = {"cfg_scale": cfg_scale, "temperature": temperature, "full": full,
                   "mean_full": statistics.mean(full.values()), "single_color_shape": colour_shape,
                   "seconds": round(time.time() - start, 1)}
            settings.append(row)
            print(f"cfg {cfg_scale:<5} temperature {temperature:<4} whole caption: "
                  + ", ".join(f"{c} {v:.1%}" for c, v in full.items())
                  + f"; single colour+shape {colour_shape:.1%}", flush=True)
    best = max(settings, key=lambda r: r["mean_full"])
    print(json.dumps({"checkpoint": args.checkpoint, "per_category": args.per_category, "seed": args.seed,
                      "settings": settings, "best": {k: best[k] for k in ("cfg_scale", "temperature", "mean_full")}}))


if __name__ == "__main__":
    main()
