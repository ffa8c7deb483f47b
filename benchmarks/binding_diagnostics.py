"""Why does a shapes model draw crisp shapes but not the caption's? Teacher-forced binding diagnostics.

    python benchmarks/binding_diagnostics.py                                   # checkpoints/shapes, 200 per type
    python benchmarks/binding_diagnostics.py --checkpoint runs/shapes --per-category 50

No sampling: `--per-category` eval-split scenes (seed 1; scenes holding a held-out colour-shape
pair skipped) of each type (single, pair, count) are rendered by the data set's own code, their
images encoded by the pipeline's image tokenizer and their captions by its text tokenizer (eval
mode), and the fp32 transformer is run teacher-forced on (caption, true image tokens).

Token regions. Image token j is "in object k" when its 4x4 pixel cell overlaps k's ground-truth box
(the box it overlaps most), else background: "bg_near" within one token of an object token,
"bg_far" the rest. "ink": object tokens whose cell holds a non-white pixel; an object's "onset":
its ink tokens in its first ink token row; its "start": its first ink token. Objects are numbered
in caption order (pair: subject, reference) and ranked in raster order by their start token.
Every figure is a mean over scenes of a per-scene mean over the tokens named (scenes without such
tokens left out); `se` is the standard error over scenes.

1. Attention on the caption, per layer: for each image query (the position whose output predicts
   image token j, j >= 1; regions are those of token j), the softmax weight on all text keys, on
   the real BPE positions and on the pads, head mean. The probabilities are recomputed here from
   each layer's fused qkv projection, 1/sqrt(head_dim) scale and mask buffer (dense softmax) and
   checked against the model: each layer's attention output against its own (block-sparse)
   attention, and the final image logits, max abs difference, first batch of each type.
2. Loss by position: image-token cross-entropy by region and per object (true and null caption).
3. What the caption is worth: loss differences to the true caption on the same tokens with the
   null text (all pads) and perturbed captions (single/count: a new colour, shape or number; pair:
   the two objects' colours or shapes exchanged, or one object's colour / shape replaced by one
   neither object has; the relation word replaced by its opposite, "flip_relation"; the two objects
   named in the other order, "reverse_order"; a perturbation that would name a held-out pair is
   skipped for that scene). A model that binds loses on both objects when their colours are
   exchanged; a bag of words loses nothing there, and under a new colour loses on the object whose
   colour vanished. One that reads the relation's direction loses where the first object starts
   under "flip_relation" and "reverse_order" (each says the objects' places the other way round).
4. Word attention: per layer, the weight an object's ink (start) tokens put on each caption word;
   for pairs the margins own word minus the other object's (head mean, and the best head), with
   the true caption and with the two words exchanged (same head): a head that reads the caption
   in order keeps its margins, one that looks up the word naming the colour already drawn flips
   them. Also: the fraction of token codes the image tokenizer changes when every object gets
   another colour (shape), boxes unchanged -- in the background too, far from the objects
   (its encoder's GroupNorm statistics are global), so background tokens carry the scene's colours.
5. Two-way choice at the first token where the scene's codes and those of an alternative
   rendering differ (pair: the two objects' colours or shapes exchanged; all types: every object
   recoloured / reshaped), where the teacher-forced context is still the same for both: how often
   log p(true code) > log p(alternative's code) under the true, the null and the alternative's own
   caption. Exchanged words test binding, replaced words test reading the word at all.

The probes (scenes, labels, the recomputed attention, perturbed captions) are `binding_probes.py`;
this script summarises and prints them. Prints tables to stderr; last stdout line: one JSON object
with every figure.
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

from binding_probes import ALTERNATIVES, CATEGORIES, WORD_TOKENS, WORDS, run_category  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402

VERIFY_TOLERANCE = 1e-4  # absolute; logits get it plus 1e-6 x their max |logit| (fp32 rounding)


# ---- summaries -------------------------------------------------------------------------------------
def scene_means(values: np.ndarray, select: np.ndarray) -> np.ndarray:
    """(S, N) values, (S, N) bool -> (S,) per-scene means over the selected tokens (NaN: none)."""
    select = select & ~np.isnan(values)
    counted = select.sum(-1)
    return np.where(counted > 0, np.where(select, values, 0).sum(-1) / np.maximum(counted, 1), np.nan)


def mean_se(per_scene: np.ndarray) -> dict:
    kept = per_scene[~np.isnan(per_scene)]
    if len(kept) == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(kept.std(ddof=1) / np.sqrt(len(kept))) if len(kept) > 1 else None
    return {"mean": round(float(kept.mean()), 4), "se": None if se is None else round(se, 4), "n": int(len(kept))}


def regions(category: str, data: dict) -> dict[str, np.ndarray]:
    """Named token selections (S, N) for loss tables."""
    owner, ink, onset, rank = data["owner"], data["ink"], data["onset"], data["rank"]  # (S, N), (S, K)
    per_object = lambda k: owner == k  # noqa: E731
    by_rank = lambda r: np.stack([np.isin(owner[s], np.flatnonzero(rank[s] == r))  # noqa: E731
                                  for s in range(len(owner))])
    near = data["near"]
    out = {"background": owner < 0, "bg_near": near, "bg_far": (owner < 0) & ~near,
           "object_box": owner >= 0, "object_ink": ink, "object_onset": onset, "object_start": data["start"]}
    if category == "pair":
        out |= {"raster_first": by_rank(0), "raster_second": by_rank(1),
                "first_onset": onset & by_rank(0), "second_onset": onset & by_rank(1),
                "subject": per_object(0), "reference": per_object(1),
                "subject_onset": onset & per_object(0), "reference_onset": onset & per_object(1),
                "subject_start": data["start"] & per_object(0), "reference_start": data["start"] & per_object(1)}
    elif category == "count":
        later = np.stack([np.isin(owner[s], np.flatnonzero(rank[s] >= 1)) for s in range(len(owner))])
        out |= {"raster_first": by_rank(0), "raster_later": later,
                "first_onset": onset & by_rank(0), "later_onset": onset & later}
    return out


def object_groups(category: str, heads: np.ndarray, rank: np.ndarray) -> dict[str, np.ndarray]:
    """(S, K, depth, H, W) per-object word attention -> named (S, depth, H, W) groups: pair by caption
    order and by raster order, count by raster order (first, mean of the later ones)."""
    by_rank = lambda r: np.stack([heads[s, np.flatnonzero(rank[s] == r)].mean(0)  # noqa: E731
                                  for s in range(len(rank))])
    if category == "single":
        return {"object": heads[:, 0]}
    if category == "pair":
        return {"subject": heads[:, 0], "reference": heads[:, 1],
                "raster_first": by_rank(0), "raster_second": by_rank(1)}
    later = np.stack([heads[s, np.flatnonzero(rank[s] >= 1)].mean(0) for s in range(len(rank))])
    return {"raster_first": by_rank(0), "raster_later": later}


def binding_margins(heads: np.ndarray, scenes: np.ndarray, layer: int, kind: str) -> np.ndarray:
    """(2, H): subject tokens' weight on the first object's word slot minus the second's, and the
    reference tokens' on the second minus the first (kind: colour or shape word), over `scenes`."""
    own_s, own_r = (0, 2) if kind == "color" else (1, 3)  # word slots: color_1, shape_1, color_2, shape_2
    m = heads[scenes][:, :2, layer].mean(0)  # (2, H, W): subject, reference
    return np.stack([m[0, :, own_s] - m[0, :, own_r], m[1, :, own_r] - m[1, :, own_s]])


def word_summary(category: str, data: dict, depth: int) -> list[dict]:
    """Per layer: head-mean weight of each object group's ink tokens on each caption word. Pairs, also
    the binding margins (`binding_margins`) of the head mean and of the head whose smaller margin
    is largest, at ink tokens and start tokens, with the true caption and (same head) with the two
    words exchanged: a head that follows caption order keeps its margins positive under the
    exchange; one that finds the word naming the colour the object is already drawn in flips them."""
    groups = object_groups(category, data["words_ink_true"], data["rank"])
    words = []
    for layer in range(depth):
        row = {}
        for group, values in groups.items():
            head_mean = values[:, layer].mean(0)  # (H, W)
            for w, word in enumerate(WORDS[category]):
                row[f"{group}_on_{word}"] = round(float(head_mean[:, w].mean()), 4)
        for kind in ("color", "shape") if category == "pair" else ():
            exchanged = data[f"words_ink_swap_{kind}s"]
            scenes = ~np.isnan(exchanged[:, 0, 0, 0, 0])  # the exchange applies (the words differ, no held-out pair)
            for tokens in WORD_TOKENS:
                true = binding_margins(data[f"words_{tokens}_true"], scenes, layer, kind)
                swapped = binding_margins(data[f"words_{tokens}_swap_{kind}s"], scenes, layer, kind)
                best = int(true.min(0).argmax())
                row[f"{kind}_margin_{tokens}"] = {
                    "head_mean": [round(float(v), 4) for v in true.mean(1)], "best_head": best,
                    "best_head_margins": [round(float(v), 4) for v in true[:, best]],
                    "exchanged_head_mean": [round(float(v), 4) for v in swapped.mean(1)],
                    "exchanged_best_head_margins": [round(float(v), 4) for v in swapped[:, best]],
                    "scenes": int(scenes.sum())}
        words.append(row)
    return words


def choice_summary(data: dict, change: str, select: np.ndarray | None = None) -> dict:
    """The two-way choice at the first token where an alternative rendering differs: how often the
    true code is more likely than the alternative's under the true caption, the null caption and the
    alternative's own caption, mean margins (nats), and where that token lies; over the scenes in
    `select` (S,) if given, else all."""
    table = data[f"choice_{change}"]  # (S, 4): first differing token (-1: none), margins true / null / alternative
    valid = table[:, 0] >= 0
    if select is not None:
        valid &= select
    first = table[valid, 0].astype(int)
    owner, near = data["owner"][valid], data["near"][valid]
    rows = np.arange(len(first))
    starts = np.where(data["start"][valid], np.arange(owner.shape[1]), owner.shape[1]).min(1)  # first start token
    out = {"scenes": int(valid.sum()), "mean_token": round(float(first.mean()), 1),
           "token_in_object": round(float((owner[rows, first] >= 0).mean()), 3),
           "token_bg_near": round(float(near[rows, first].mean()), 3),
           "token_before_any_ink": round(float((first < starts).mean()), 3)}
    for col, name in ((1, "true"), (2, "null"), (3, "alternative")):
        margin = table[valid, col]
        kept = margin[~np.isnan(margin)]
        out[f"prefers_true_{name}_caption"] = round(float((kept > 0).mean()), 3) if len(kept) else None
        out[f"margin_{name}_caption"] = mean_se(margin)
    both = table[valid, 1] - table[valid, 3]
    out["caption_effect"] = mean_se(both)  # margin(true caption) - margin(alternative's caption), same scenes
    return out


def summarise(category: str, data: dict, verify: dict) -> dict:
    n_tokens = data["owner"].shape[1]
    queries = np.arange(n_tokens) >= 1  # image queries only: token 0 is predicted by a text position
    owner, ink = data["owner"], data["ink"]
    depth = data["mass"].shape[2]
    attention = []
    for layer in range(depth):
        row = {}
        for m, what in enumerate(("text", "real", "pad")):
            values = data["mass"][:, m, layer]  # (S, N)
            for name, sel in (("all", np.ones_like(ink)), ("object", owner >= 0), ("ink", ink),
                              ("background", owner < 0)):
                row[f"{what}_{name}"] = mean_se(scene_means(values, sel & queries))["mean"]
        attention.append(row)
    selections = regions(category, data)
    loss = {cond: {name: mean_se(scene_means(data["ce"][cond], sel))["mean"] for name, sel in selections.items()}
            for cond in ("true", "null")}  # perturbations apply to subsets: see delta_vs_true
    delta = {}
    for cond, ce in data["ce"].items():
        if cond == "true":
            continue
        diff = ce - data["ce"]["true"]  # NaN where the perturbation was skipped
        delta[cond] = {name: mean_se(scene_means(diff, sel)) for name, sel in selections.items()}
    words = word_summary(category, data, depth)
    extra = {}
    if category == "pair":
        extra["subject_raster_first_fraction"] = round(float((data["rank"][:, 0] == 0).mean()), 4)
        # above / below: the raster-first object is the upper one, so the caption alone says which
        # object comes first; left / right: only the first object's column hints at it
        extra["exchange_by_axis"] = {
            axis: {change: choice_summary(data, change, sel)["caption_effect"] for change in ("swap_colors", "swap_shapes")}
            for axis, sel in (("above_below", data["vertical"]), ("left_right", ~data["vertical"]))}
    near = data["near"]
    extra["image_tokenizer_recode"] = {  # fraction of tokens whose code changes with the objects' colour / shape
        f"{key}_{name}": mean_se(scene_means(data[f"recode_{key}"].astype(float), sel))["mean"]
        for key in ("color", "shape") for name, sel in (("bg_far", (owner < 0) & ~near), ("bg_near", near),
                                                         ("object_box", owner >= 0))}
    extra["first_difference_choice"] = {change: choice_summary(data, change) for change in ALTERNATIVES[category]}
    return {"scenes": int(len(owner)), **extra, "verify": verify, "attention": attention, "loss": loss,
            "delta_vs_true": delta, "word_attention": words}


# ---- printing --------------------------------------------------------------------------------------
def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pair_text(values) -> str:
    return "/".join(fmt(v, 2) for v in values)


def print_tables(results: dict, kinds: list[str]) -> None:
    out = lambda line="": print(line, file=sys.stderr)  # noqa: E731
    for category, res in results["categories"].items():
        out(f"\n=== {category} ({res['scenes']} scenes) ===")
        out("attention on the caption, image queries, head mean: weight on all text / real BPE positions / pads | "
            "on all text by the predicted token's region")
        out("layer kind    text   real    pad |   obj    ink     bg")
        for layer, row in enumerate(res["attention"]):
            out(f"{layer:5d} {kinds[layer]:6s} {fmt(row['text_all'])} {fmt(row['real_all'])} {fmt(row['pad_all'])} | "
                f"{fmt(row['text_object'])} {fmt(row['text_ink'])} {fmt(row['text_background'])}")
        out("image tokenizer: fraction of token codes that change when every object gets another colour / shape, "
            "same boxes: " + ", ".join(f"{k} {v:.3f}" for k, v in res["image_tokenizer_recode"].items()))
        out("two-way choice at the first token where an alternative rendering differs (same context before it): "
            "P(log p(true code) > log p(alternative's code)) under the true / null / alternative's caption; margins "
            "in nats; effect = margin(true caption) - margin(alternative's caption)")
        out(f"{'alternative':12s} {'n':>4s} {'token':>6s} {'in obj':>7s} {'bg near':>8s} {'pre-ink':>8s} {'true':>6s} "
            f"{'null':>6s} {'alt':>6s} {'margin true':>12s} {'margin alt':>12s} {'effect':>14s}")
        for change, row in res["first_difference_choice"].items():
            effect = row["caption_effect"]
            out(f"{change:12s} {row['scenes']:4d} {row['mean_token']:6.1f} {row['token_in_object']:7.3f} "
                f"{row['token_bg_near']:8.3f} {row['token_before_any_ink']:8.3f} "
                f"{fmt(row['prefers_true_true_caption']):>6s} {fmt(row['prefers_true_null_caption']):>6s} "
                f"{fmt(row['prefers_true_alternative_caption']):>6s} {fmt(row['margin_true_caption']['mean']):>12s} "
                f"{fmt(row['margin_alternative_caption']['mean']):>12s} "
                f"{fmt(effect['mean']) + '±' + fmt(effect['se']):>14s}")
        names = list(next(iter(res["loss"].values())))
        out("image-token cross-entropy (nats) by region")
        out(f"{'condition':13s}" + "".join(f"{n[:15]:>16s}" for n in names))
        for cond, row in res["loss"].items():
            out(f"{cond:13s}" + "".join(f"{fmt(row[n]):>16s}" for n in names))
        out("loss(condition) - loss(true caption), same tokens (mean ± se over scenes)")
        for cond, row in res["delta_vs_true"].items():
            cells = "".join(f"{fmt(row[n]['mean'], 3) + '±' + fmt(row[n]['se'], 3):>16s}" for n in names)
            out(f"{cond:13s}{cells}   n={row['object_box']['n']}")
        out("attention of an object's ink tokens on caption words (head mean)")
        keys = [k for k in res["word_attention"][0] if "_on_" in k and (category == "count" or "raster" not in k)]
        short = {"subject": "subj", "reference": "ref", "raster_first": "1st", "raster_later": "later", "object": "obj"}
        labels = ["%s>%s" % (short[k.split("_on_")[0]], k.split("_on_")[1]) for k in keys]
        out("layer " + " ".join(f"{label.replace('color', 'c').replace('shape', 's'):>9s}" for label in labels))
        for layer, row in enumerate(res["word_attention"]):
            out(f"{layer:5d} " + " ".join(f"{fmt(row.get(k)):>9s}" for k in keys))
        if category != "pair":
            continue
        out("binding margins, subject/reference tokens: weight on the own object's word minus the other's (head mean; "
            "hN = the head whose smaller margin is largest; exch = that head with the two words exchanged)")
        out("layer" + "".join(f"{kind + ' ' + tokens:>44s}" for kind in ("color", "shape") for tokens in WORD_TOKENS))
        for layer, row in enumerate(res["word_attention"]):
            cells = ""
            for kind in ("color", "shape"):
                for tokens in WORD_TOKENS:
                    m = row[f"{kind}_margin_{tokens}"]
                    exchanged = pair_text(m["exchanged_best_head_margins"])
                    cells += (f"{pair_text(m['head_mean']):>12s} h{m['best_head']} "
                              f"{pair_text(m['best_head_margins']):>11s} exch {exchanged:>11s}")
            out(f"{layer:5d}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/shapes",
                        help="pipeline folder (default: checkpoints/shapes)")
    parser.add_argument("--per-category", type=int, default=200, help="scenes per type (default: 200)")
    parser.add_argument("--seed", type=int, default=1, help="eval-split data set seed (default: 1)")
    parser.add_argument("--batch-size", type=int, default=40)
    args = parser.parse_args()
    start = time.time()
    pipe = DallePipeline.from_pretrained(args.checkpoint, dtype=torch.float32)
    pipe.text_tokenizer.eval()
    kinds = list(pipe.transformer.kinds)
    results = {"checkpoint": args.checkpoint, "per_category": args.per_category, "seed": args.seed,
               "split": "eval", "layer_kinds": kinds, "categories": {}}
    for category in CATEGORIES:
        data, verify = run_category(pipe, category, args.per_category, args.seed, args.batch_size)
        results["categories"][category] = summarise(category, data, verify)
    checks = [res["verify"] for res in results["categories"].values()]
    worst = max(max(v["layer_output_max_abs_diff"], v["logits_max_abs_diff"]) for v in checks)
    passed = all(v["layer_output_max_abs_diff"] <= VERIFY_TOLERANCE and v["logits_max_abs_diff"]
                 <= VERIFY_TOLERANCE + 1e-6 * v["logits_max_abs"] for v in checks)
    results["verification"] = {"max_abs_diff": worst, "tolerance": VERIFY_TOLERANCE, "passed": passed}
    results["seconds"] = round(time.time() - start, 1)
    results["torch_threads"] = torch.get_num_threads()
    print_tables(results, kinds)
    print(f"\nverification: recomputed attention vs the model's own (block-sparse) attention and logits, "
          f"first batch of each type: max abs diff {worst:.2e} (tolerance {VERIFY_TOLERANCE:g}, logits "
          f"+ 1e-6 x max |logit|) -> {'PASS' if passed else 'FAIL'}; wall {results['seconds']} s", file=sys.stderr)
    print(json.dumps(results))
    if not results["verification"]["passed"]:  # the tables above are then not the model's own numbers
        sys.exit(1)


if __name__ == "__main__":
    main()
