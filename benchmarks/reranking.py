"""How well does a shapes model's CLIP rerank? Binding probe + rerank-at-k curve.

    python3 benchmarks/reranking.py --checkpoint checkpoints/shapes
    python3 benchmarks/reranking.py --checkpoint checkpoints/shapes --clip runs/other/clip --candidates 32

1. Binding probe (no sampling, seconds): for `--probe` pair prompts, the CLIP scores the prompt's
   render against a render of the same scene with the two objects swapped, with their colours
   exchanged and with their shapes exchanged. Accuracy = how often the true render scores higher
   (0.5 = chance: the CLIP reads the caption as a bag of words). This is the comparison reranking
   makes, on clean renders.
2. Rerank curve: `--candidates` K samples for each of `--prompts` pair prompts (seed 1, not
   `dalle-proto evaluate`'s seed 0), each scored by the shapes evaluator and by the CLIP. For
   k = 1, 2, 4, ... K: `clip@k` is the whole-caption accuracy when the CLIP keeps the best of the
   first k candidates (what `--rerank k` does), `oracle@k` when a perfect reranker does (at least
   one of the k is right). The gap between the two is what a better reranker could still win.
   `--samples FILE.pt` keeps the candidates, so that several CLIPs (`--clip`) are compared on
   the same ones. `misses`: why the CLIP's pick of all K is wrong (no right candidate at all, the
   wrong number of objects, or which of colour / shape / relation it gets wrong).

Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalle_proto.clip import load_clip  # noqa: E402
from dalle_proto.datasets.augmentation import pil_to_tensor  # noqa: E402
from dalle_proto.datasets.shapes import render_caption  # noqa: E402
from dalle_proto.datasets.shapes_grammar import compose_caption, parse_caption  # noqa: E402
from dalle_proto.evaluation import clip_embeddings, prompt_set  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.shapes_evaluator import evaluate_each  # noqa: E402

def exchanged(caption: str, change: str) -> str:
    """The pair caption with its objects swapped, or their colours / shapes exchanged."""
    spec = copy.deepcopy(parse_caption(caption))
    first, second = spec["objects"]
    if change == "swap":
        spec["objects"] = [second, first]
    else:
        first[change], second[change] = second[change], first[change]
    return compose_caption(spec)


def scores(pipe: DallePipeline, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The CLIP's reranking score (cosine) of image i against caption i, (N,)."""
    image_emb, text_emb = clip_embeddings(pipe.clip, pipe.text_tokenizer, images, captions)
    return (image_emb * text_emb).sum(-1)  # (N,)


def binding_probe(pipe: DallePipeline, captions: list[str]) -> dict:
    def renders(texts: list[str]) -> torch.Tensor:
        return torch.stack([pil_to_tensor(render_caption(t, seed=5).image) for t in texts])  # (N, 3, S, S)

    true = scores(pipe, renders(captions), captions)  # (N,)
    result = {}
    for change in ("swap", "color", "shape"):
        others = [exchanged(c, change) for c in captions]
        differs = torch.tensor([o != c for o, c in zip(others, captions)])  # same colours: nothing to exchange
        wrong = scores(pipe, renders(others), captions)
        result[f"binding_{change}_acc"] = round(float((true > wrong)[differs].float().mean()), 3)
    return result


def sample_candidates(pipe: DallePipeline, captions: list[str], candidates: int, batch_size: int,
                      samples: str | None, checkpoint: str) -> torch.Tensor:
    """(P*K, 3, S, S) candidates in [-1, 1]; with `samples`, loaded from that file when it holds the
    same checkpoint, prompts and K (so several CLIPs are scored on identical candidates), else drawn
    and saved there."""
    key = {"checkpoint": checkpoint, "captions": captions, "candidates": candidates}
    if samples and Path(samples).exists():
        saved = torch.load(samples, weights_only=True)
        if {k: saved[k] for k in key} != key:
            raise SystemExit(f"{samples} holds candidates of another checkpoint, prompt set or --candidates; "
                             "delete it or pass another --samples file")
        return saved["images"].float() / 127.5 - 1  # the PIL images' own uint8 values: exact
    images = []
    for start in range(0, len(captions), batch_size):
        images += pipe(captions[start:start + batch_size], num_images=candidates, seed=1 + start)
    images = torch.stack([pil_to_tensor(i) for i in images])  # (P*K, 3, S, S)
    if samples:
        torch.save(key | {"images": ((images + 1) * 127.5).round().to(torch.uint8)}, samples)
    return images


def rerank_curve(pipe: DallePipeline, captions: list[str], candidates: int, images: torch.Tensor) -> dict:
    rows = [c for c in captions for _ in range(candidates)]
    judged = evaluate_each(images, rows)
    correct = torch.tensor([r.correct for r in judged]).float().view(-1, candidates)  # (P, K)
    score = scores(pipe, images, rows).view(-1, candidates)  # (P, K)
    result = {"candidate_accuracy": round(float(correct.mean()), 3)}
    for attribute in ("color_shape", "relation"):  # which part of the caption the samples miss
        hits = [r.attributes[attribute] for r in judged if attribute in r.attributes]
        result[f"candidate_{attribute}_acc"] = round(sum(hits) / max(len(hits), 1), 3)
    k = 1
    while k <= candidates:
        chosen = score[:, :k].argmax(1, keepdim=True)  # (P, 1)
        result[f"clip@{k}"] = round(float(correct[:, :k].gather(1, chosen).mean()), 3)
        result[f"oracle@{k}"] = round(float(correct[:, :k].max(1).values.mean()), 3)
        k *= 2
    result["misses"] = misses(judged, correct, score)
    return result


def misses(judged: list, correct: torch.Tensor, score: torch.Tensor) -> dict:
    """Why the CLIP's pick among all K candidates is wrong, per prompt: no candidate is right, or
    the attribute(s) the pick gets wrong (`objects`: more or fewer than two objects detected)."""
    found = {"no_right_candidate": 0, "objects": 0, "color": 0, "shape": 0, "relation": 0}
    candidates = correct.shape[1]
    for p, pick in enumerate(score.argmax(1).tolist()):
        r = judged[p * candidates + pick]
        if r.correct:
            continue
        if not correct[p].any():
            found["no_right_candidate"] += 1
        elif len(r.objects) != 2:
            found["objects"] += 1
        else:  # an attribute may be named with others: a wrong shape often breaks the relation too
            for attribute in ("color", "shape", "relation"):
                found[attribute] += not r.attributes.get(attribute, True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model folder with clip/, e.g. checkpoints/shapes")
    parser.add_argument("--clip", default=None, help="score with this CLIP folder instead of the model's own")
    parser.add_argument("--probe", type=int, default=200, help="pair prompts in the binding probe (default: 200)")
    parser.add_argument("--prompts", type=int, default=50, help="pair prompts in the rerank curve (default: 50)")
    parser.add_argument("--candidates", type=int, default=16, help="samples per prompt (default: 16; 0: probe only)")
    parser.add_argument("--batch-size", type=int, default=25, help="prompts sampled at a time")
    parser.add_argument("--samples", default=None, metavar="FILE.pt",
                        help="keep the sampled candidates in this file and reuse them on the next run "
                             "(score several --clip folders on the same candidates)")
    args = parser.parse_args()
    pipe = DallePipeline.from_pretrained(args.checkpoint)
    if args.clip:
        pipe.clip = load_clip(args.clip).float().eval()
    if pipe.clip is None:
        raise SystemExit(f"{args.checkpoint} has no clip/ and no --clip was given: nothing reranks")
    pairs = [p.caption for p in prompt_set(max(args.probe, args.prompts), seed=1) if p.category == "pair"]
    start = time.time()
    result = {"checkpoint": args.checkpoint, "clip": args.clip or f"{args.checkpoint}/clip",
              **binding_probe(pipe, pairs[:args.probe])}
    print(f"binding probe ({args.probe} pair prompts): {result}", flush=True)
    if args.candidates:
        captions = pairs[:args.prompts]
        images = sample_candidates(pipe, captions, args.candidates, args.batch_size, args.samples, args.checkpoint)
        result |= rerank_curve(pipe, captions, args.candidates, images)
    result |= {"prompts": args.prompts, "candidates": args.candidates, "seconds": round(time.time() - start, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
