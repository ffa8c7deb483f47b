"""Why held-out colour-shape pairs fail: the tokenizer's ceiling, and where a model's loss goes.

    python benchmarks/held_out_pairs.py --checkpoint checkpoints/shapes

For each of the six held-out pairs (SHAPES.md; never in a training picture or caption) it renders
`--per-pair` single objects ("a [small|large] COLOUR SHAPE", layouts from `render_caption`) and
measures:
- `reconstructed_right`: the shapes evaluator's whole-caption accuracy on the image tokenizer's
  reconstructions (the ceiling for any transformer sampling through it), and `rare_codes`: the
  share of the objects' tokens whose code occurs under 100 times in 2048 training token grids;
- teacher-forced, the transformer's summed cross-entropy over the object's tokens, per row of the
  object from its first row (onset), for the held-out picture under its caption, against the same
  geometry recoloured to a colour the shape is seen in (under that caption): `held_out_rows`,
  `seen_rows`, and the totals. A loss that stays high after the onset row means the model does not
  carry a shape's outline over to a colour it never saw drawn that way.
fp32, deterministic. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dalle_proto.datasets.augmentation import pil_to_tensor  # noqa: E402
from dalle_proto.datasets.shapes import render_caption  # noqa: E402
from dalle_proto.datasets.shapes_grammar import article  # noqa: E402
from dalle_proto.datasets.shapes_render import draw_objects  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.shapes_evaluator import evaluate_batch  # noqa: E402
from dalle_proto.token_cache import TokenCache  # noqa: E402

# each held-out pair, and a colour its shape is drawn in during training (the control)
PAIRS = (("purple", "circle", "blue"), ("orange", "square", "red"), ("cyan", "triangle", "blue"),
         ("red", "diamond", "orange"), ("green", "star", "blue"), ("yellow", "cross", "orange"))
ROWS = 7  # object rows reported, from the onset row (a large object spans 7 token rows)


def scenes(color: str, shape: str, recolor: str, count: int) -> tuple[list[str], list[list[dict]]]:
    """Captions and object lists: the held-out pair's layouts, drawn in `recolor`."""
    captions, objects = [], []
    for i in range(count):
        size = ("small", "large")[i % 2]
        scene = render_caption(f"{article(size)} {size} {color} {shape}", seed=100 + i)
        captions.append(f"{article(size)} {size} {recolor} {shape}")
        objects.append([dict(scene.truth["objects"][0], color=recolor)])
    return captions, objects


def pictures(objects: list[list[dict]]) -> torch.Tensor:
    return torch.stack([pil_to_tensor(draw_objects(o, 64)) for o in objects])  # (B, 3, 64, 64)


@torch.inference_mode()
def object_rows(pipe, captions: list[str], objects: list[list[dict]], ids: torch.Tensor) -> np.ndarray:
    """(ROWS,) mean over scenes of the summed cross-entropy of each object row's tokens; ids (B, h, w)
    are the pictures' codes."""
    ids = ids.flatten(1)  # (B, N)
    _, logits = pipe.transformer(pipe.text_tokenizer.encode(captions), ids)  # (B, N, Vi)
    g = pipe.transformer.config.image_grid
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none").view(len(ids), g, g)
    f = 64 // g
    rows = np.zeros((len(ids), ROWS))
    for i, objs in enumerate(objects):
        x0, y0, x1, y1 = objs[0]["box"]
        top, left, right = y0 // f, x0 // f, (x1 - 1) // f
        for r in range(top, min((y1 - 1) // f + 1, top + ROWS)):
            rows[i, r - top] = float(ce[i, r, left:right + 1].sum())
    return rows.mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "shapes"), help="model folder")
    parser.add_argument("--per-pair", type=int, default=24, help="pictures per held-out pair (default: 24)")
    parser.add_argument("--token-cache", default=None,
                        help="a training token cache folder for `rare_codes` (skipped when not given)")
    args = parser.parse_args()
    start = time.time()
    pipe = DallePipeline.from_pretrained(args.checkpoint, dtype=torch.float32)
    pipe.text_tokenizer.eval()
    tokenizer = pipe.image_tokenizer
    freq = None
    if args.token_cache:
        cache = TokenCache(args.token_cache)
        grids = np.stack([cache[i][0].numpy() for i in range(min(2048, len(cache)))])
        freq = np.bincount(grids.reshape(-1), minlength=tokenizer.codebook_size)
    results = {}
    for color, shape, seen in PAIRS:
        captions, objects = scenes(color, shape, color, args.per_pair)
        seen_captions, seen_objects = scenes(color, shape, seen, args.per_pair)
        with torch.inference_mode():
            ids = tokenizer.encode(pictures(objects))  # (B, h, w)
            recon = tokenizer.decode(ids)  # (B, 3, 64, 64)
            seen_ids = tokenizer.encode(pictures(seen_objects))  # (B, h, w)
        held = object_rows(pipe, captions, objects, ids)
        control = object_rows(pipe, seen_captions, seen_objects, seen_ids)
        entry = {"reconstructed_right": evaluate_batch(recon, captions)["overall"],
                 "held_out_rows": [round(float(v), 2) for v in held], "seen_colour": seen,
                 "seen_rows": [round(float(v), 2) for v in control],
                 "held_out_total": round(float(held.sum()), 1), "seen_total": round(float(control.sum()), 1)}
        if freq is not None:
            codes = ids.flatten().numpy()
            ink = codes[codes != np.bincount(codes).argmax()]  # the white background is one code
            entry["rare_codes"] = round(float(np.mean(freq[ink] < 100)), 3)
        results[f"{color} {shape}"] = entry
        print(f"{color} {shape}: reconstructed right {entry['reconstructed_right']:.0%}; object rows from the "
              f"onset, nats: held-out {entry['held_out_rows']} (total {entry['held_out_total']}), in {seen} "
              f"{entry['seen_rows']} (total {entry['seen_total']})", file=sys.stderr, flush=True)
    totals = {k: round(sum(e[k] for e in results.values()), 1) for k in ("held_out_total", "seen_total")}
    print(json.dumps({"checkpoint": args.checkpoint, "per_pair": args.per_pair, "pairs": results, **totals,
                      "seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
