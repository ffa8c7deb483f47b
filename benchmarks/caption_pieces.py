"""How BPE dropout splits a shapes run's training captions.

    python benchmarks/caption_pieces.py --tokenizer checkpoints/shapes/text_tokenizer --mix 25 50 25

For `--count` training scenes (seed 0, the given mix) per scene type: text ids of the caption in eval
mode (what sampling sees) and in training mode with dropout p (the tokenizer's own, or `--p`), the
latter before the text_len cap; the fraction of training captions past text_len (training then uses
the caption's eval-mode ids, `TextTokenizer._encode_all`), and the fraction a training step sees in
exactly its eval-mode form, cap included. The dropout draws one generator per caption (`--seed`), as
a training run does. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dalle_proto.datasets.shapes import sample_scene  # noqa: E402
from dalle_proto.text_tokenizer import TextTokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="checkpoints/shapes/text_tokenizer", help="text tokenizer folder")
    parser.add_argument("--mix", type=int, nargs=3, default=[25, 50, 25], help="single / pair / count percent")
    parser.add_argument("--count", type=int, default=4000, help="training scenes (default: 4000)")
    parser.add_argument("--p", type=float, default=None, help="dropout (default: the tokenizer's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok = TextTokenizer.from_pretrained(args.tokenizer)
    p = tok.config.bpe_dropout if args.p is None else args.p
    rows: dict[str, list[tuple[int, int, bool]]] = {}
    for index in range(args.count):
        caption, truth = sample_scene(0, index, mix=args.mix)
        clean = tok.encode_ids(caption)  # eval mode
        dropped = tok.dropout_ids(caption, np.random.default_rng([args.seed, index]), p)
        seen = dropped if len(dropped) <= tok.text_len else clean
        rows.setdefault(truth["type"], []).append((len(clean), len(dropped), seen == clean))
    result = {"tokenizer": args.tokenizer, "bpe_dropout": p, "text_len": tok.text_len, "mix": args.mix,
              "count": args.count, "types": {}}
    for kind, values in sorted(rows.items()):
        v = np.array(values)
        eval_ids, dropout_ids, past, seen = v[:, 0].mean(), v[:, 1].mean(), (v[:, 1] > tok.text_len).mean(), v[:, 2].mean()
        result["types"][kind] = {"captions": len(v), "mean_ids_eval": round(float(eval_ids), 2),
                                 "mean_ids_dropout": round(float(dropout_ids), 2),
                                 "past_text_len": round(float(past), 4), "seen_as_eval": round(float(seen), 4)}
        print(f"{kind:6s} {len(v):5d} captions: {eval_ids:5.2f} ids in eval mode, {dropout_ids:5.2f} with dropout {p}; "
              f"past text_len {tok.text_len}: {past:.1%}; seen in training exactly as in eval mode: {seen:.1%}",
              file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
