"""`dalle-proto evaluate`: how faithful and how varied are a trained pipeline's pictures?

    report = evaluate_pipeline(DallePipeline.from_pretrained("runs/shapes"), "runs/shapes/eval", rerank=8)

Prompts (`prompt_set`): a fixed, seeded set drawn with the shapes grammar (shared/SHAPES.md), at
least `per_category` captions in each category:
    single, pair, count   train-split captions of that scene type (no held-out colour-shape pair)
    held_out              eval-split captions forced to name one of the six held-out pairs (any type)
One image is drawn per prompt (the pipeline's seed is `seed` + batch number). With `rerank=N` a
second pass draws N candidates per image and keeps the one the pipeline's CLIP scores best.

Metrics of each pass:
- attribute accuracy per category (shapes_evaluator: color, shape, color_shape, size, position,
  relation, count, and `full` = the whole caption holds and nothing else is shown);
- FID: the Fréchet distance between Gaussians fitted to features of the samples and of reference
  renders: ground-truth renders of the same prompts (`render_caption` with seed + 1, so their
  layouts are independent draws), which makes the two sets differ only in what the model got wrong.
  Feature space: the CLIP image embedding (unit norm, `embed_dim`; an ensemble's joined ones) when the pipeline has a CLIP;
  else the pixels average-pooled to 8x8 (192 values). The report names the space used: FIDs in
  different spaces, or with different CLIPs, are not comparable;
- position diversity: over single prompts that leave the position open, the normalised entropy
  (0..1, 1 = uniform) of the 3x3 grid cell of the detected object (the data set draws it uniformly);
- CLIP score: 100 x the mean cosine similarity of each sample with its prompt (needs clip/);
- R-precision: top-1 retrieval of the true prompt among 99 other prompts of the set (different
  after the optional "a picture of " prefix is dropped) by CLIP similarity (needs clip/).
  Reranking optimises the same CLIP, so its CLIP score and R-precision are flattered.

Other data (emoji, folders): `clip_r_precision` and `clip_score` work on any (images, captions),
e.g. a model card's R-precision on training captions; `evaluate_pipeline(..., captions=[...])`
samples given captions and reports only those two (no ground truth, no attribute table).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle_proto.datasets.augmentation import pil_to_tensor
from dalle_proto.datasets.shapes import HELD_OUT_EVAL_EVERY, render_caption, sample_scene
from dalle_proto.datasets.shapes_grammar import PREFIXES, parse_caption
from dalle_proto.image_grid import make_image_grid
from dalle_proto.pretrained import atomic_write_bytes
from dalle_proto.shapes_evaluator import ATTRIBUTES, evaluate_each

CATEGORIES: tuple[str, ...] = ("single", "pair", "count", "held_out")
COLUMNS: tuple[str, ...] = (*ATTRIBUTES, "full")
GRID_IMAGES = 32  # samples per category in each grid PNG


@dataclass(frozen=True)
class Prompt:
    category: str
    caption: str


# ---- the prompt set ------------------------------------------------------------------------------
def prompt_set(per_category: int = 200, seed: int = 0) -> list[Prompt]:
    """`per_category` prompts of each category (module docstring), in CATEGORIES order; a pure
    function of its arguments."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    found: dict[str, list[str]] = {c: [] for c in CATEGORIES[:3]}
    index = 0
    while min(len(v) for v in found.values()) < per_category:
        caption, truth = sample_scene(seed, index, split="train")
        if len(found[truth["type"]]) < per_category:
            found[truth["type"]].append(caption)
        index += 1
    # eval-split scenes whose index is a multiple of HELD_OUT_EVAL_EVERY always hold a held-out pair
    found["held_out"] = [sample_scene(seed, k * HELD_OUT_EVAL_EVERY, split="eval")[0] for k in range(per_category)]
    return [Prompt(category, caption) for category in CATEGORIES for caption in found[category]]


# ---- model-free statistics ---------------------------------------------------------------------
def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. tr (S_a S_b)^(1/2) is computed as
    the sum of square roots of the eigenvalues of the symmetric S_a^(1/2) S_b S_a^(1/2) (same spectrum),
    both via eigh, so no general matrix square root (scipy) is needed."""
    a, b = features_a.double(), features_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two (N, D) feature sets with N >= 2 and the same D; "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)  # (D, D)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # (D, D)
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 192): pixels average-pooled to 8x8 (the CLIP-free FID space)."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def position_entropy(cells: Sequence[tuple[int, int]]) -> float:
    """Entropy of the 3x3 cell histogram divided by log 9: 1 = uniform, 0 = always one cell."""
    if not cells:
        return float("nan")
    counts = np.array(list(Counter(cells).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(9))


def without_prefix(caption: str) -> str:
    """The caption without the grammar's optional prefix ("a picture of " ...): same meaning, same key."""
    for prefix in sorted((p for p in PREFIXES if p), key=len, reverse=True):
        if caption.startswith(prefix):
            return caption[len(prefix):]
    return caption


# ---- CLIP metrics (any data) -------------------------------------------------------------------
@torch.no_grad()
def clip_embeddings(clip: Any, text_tokenizer: Any, images: torch.Tensor | None = None,
                    captions: Sequence[str] | None = None, batch_size: int = 256) -> tuple:
    """(image embeddings (N, E) or None, caption embeddings (M, E) or None), in batches."""
    device = next(clip.parameters()).device
    image_emb = None if images is None else torch.cat(
        [clip.encode_image(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])
    text_emb = None
    if captions is not None:
        ids = text_tokenizer.eval().encode(list(captions))  # (M, T)
        text_emb = torch.cat([clip.encode_text(chunk.to(device)).float().cpu() for chunk in ids.split(batch_size)])
    return image_emb, text_emb


def clip_score(clip: Any, text_tokenizer: Any, images: torch.Tensor, captions: Sequence[str]) -> float:
    """100 x the mean cosine similarity between image i (B, 3, H, W) in [-1, 1] and caption i."""
    image_emb, text_emb = clip_embeddings(clip, text_tokenizer, images, captions)
    return 100.0 * float((image_emb * text_emb).sum(-1).mean())


def clip_r_precision(clip: Any, text_tokenizer: Any, images: torch.Tensor, captions: Sequence[str],
                     num_distractors: int = 99, seed: int = 0,
                     caption_key: Callable[[str], str] = lambda c: c) -> float:
    """Share of images whose own caption scores highest (top-1) among itself and `num_distractors`
    random other captions of `captions` (the DALL·E/AttnGAN R-precision; chance = 1 / (1 + distractors)).
    A distractor must differ from the true caption after `caption_key` (e.g. `without_prefix`);
    fewer distinct captions than that use all of them. Ties count as misses."""
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"clip_r_precision: {len(images)} images but {len(captions)} captions")
    keys = [caption_key(c) for c in captions]
    unique = sorted(set(keys))
    column = {k: i for i, k in enumerate(unique)}
    representative = {}
    for caption, key in zip(captions, keys):
        representative.setdefault(key, caption)
    image_emb, text_emb = clip_embeddings(clip, text_tokenizer, images, [representative[k] for k in unique])
    # score against the image's own caption text, not its key's representative
    own = (image_emb * clip_embeddings(clip, text_tokenizer, None, captions)[1]).sum(-1)  # (N,)
    similarity = image_emb @ text_emb.T  # (N, U)
    rng = np.random.default_rng(seed)
    hits = 0
    for i, key in enumerate(keys):
        others = np.array([j for j in range(len(unique)) if j != column[key]])
        if len(others) > num_distractors:
            others = rng.choice(others, num_distractors, replace=False)
        hits += bool(len(others) == 0 or own[i] > similarity[i, others].max())
    return hits / len(captions)


# ---- the evaluation ------------------------------------------------------------------------------
def sample_prompts(pipe: Any, captions: Sequence[str], seed: int, batch_size: int, rerank: int | None,
                   cfg_scale: float | None, desc: str) -> torch.Tensor:
    """One image per caption from `pipe`, as (N, 3, H, W) in [-1, 1]; batch b uses seed + b."""
    options = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
    images = []
    batches = range(0, len(captions), batch_size)
    for b, start in enumerate(tqdm(batches, desc=desc, unit="batch")):
        chunk = list(captions[start:start + batch_size])
        pil = pipe(chunk, num_images=1, seed=seed + b, rerank=rerank, **options)
        images += [pil_to_tensor(image) for image in pil]
    return torch.stack(images)  # (N, 3, H, W)


def accuracy_table(results: Sequence[Any], prompts: Sequence[Prompt]) -> dict:
    """Per category of `prompts`: the fraction of each stated attribute the evaluator's `results`
    (one per prompt) found right, "full" (whole caption right, nothing else shown) and "n"."""
    table = {}
    for category in [c for c in CATEGORIES if any(p.category == c for p in prompts)]:
        rows = [r for r, p in zip(results, prompts) if p.category == category]
        counts = Counter(a for r in rows for a in r.attributes)
        hits = Counter(a for r in rows for a, ok in r.attributes.items() if ok)
        table[category] = {a: hits[a] / counts[a] for a in ATTRIBUTES if counts[a]}
        table[category]["full"] = sum(r.correct for r in rows) / len(rows)
        table[category]["n"] = len(rows)
    return table


def _pass_metrics(pipe: Any, prompts: list[Prompt], images: torch.Tensor, reference: torch.Tensor | None,
                  seed: int, shapes: bool) -> dict:
    captions = [p.caption for p in prompts]
    clip, tokenizer = getattr(pipe, "clip", None), pipe.text_tokenizer
    metrics: dict[str, Any] = {"n": len(prompts)}
    if shapes:
        results = evaluate_each(images, captions)
        metrics["accuracy"] = accuracy_table(results, prompts)
        cells = []
        for r, p in zip(results, prompts):
            spec = parse_caption(p.caption)
            if p.category == "single" and spec["objects"][0]["position"] is None and r.objects:
                wanted = spec["objects"][0]
                subject = max(r.objects, key=lambda o: ((o.color == wanted["color"]) + (o.shape == wanted["shape"]),
                                                        o.area))
                cells.append(tuple(subject.cell))
        metrics["position_diversity"] = {"normalised_entropy": position_entropy(cells), "n": len(cells)}
    if reference is not None:
        if clip is not None:
            features = [clip_embeddings(clip, tokenizer, x)[0] for x in (images, reference)]
        else:
            features = [pixel_features(x) for x in (images, reference)]
        metrics["fid"] = frechet_distance(*features)
    if clip is not None:
        metrics["clip_score"] = clip_score(clip, tokenizer, images, captions)
        metrics["r_precision"] = clip_r_precision(clip, tokenizer, images, captions, seed=seed,
                                                  caption_key=without_prefix if shapes else (lambda c: c))
    return metrics


def evaluate_pipeline(pipe: Any, out_dir: str | os.PathLike, *, per_category: int = 200, seed: int = 0,
                      rerank: int | None = None, batch_size: int = 32, cfg_scale: float | None = None,
                      captions: Sequence[str] | None = None, categories: Sequence[str] | None = None) -> dict:
    """Evaluate `pipe` (a DallePipeline or anything with its call signature and `text_tokenizer`,
    `clip` attributes), write `evaluation.md`, `evaluation.json` and `grids/*.png` into `out_dir`
    and return the report dict. `captions`: evaluate these instead of the shapes prompt set.
    `categories`: only these categories' prompts of the shapes prompt set (the same prompts as in a
    whole run; their samples differ, since batch b is sampled with seed + b)."""
    out = Path(out_dir)
    shapes = captions is None
    prompts = prompt_set(per_category, seed) if shapes else [Prompt("custom", c) for c in captions]
    if categories is not None:
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown or not shapes:
            raise ValueError(f"categories: expected some of {', '.join(CATEGORIES)} (shapes prompt set only), "
                             f"got {', '.join(unknown) if unknown else 'them with custom captions'}")
        prompts = [p for p in prompts if p.category in categories]
    if not prompts:
        raise ValueError("evaluate_pipeline: no captions to evaluate")
    clip = getattr(pipe, "clip", None)
    if rerank is not None and clip is None:
        raise ValueError(f"rerank={rerank} needs the pipeline's CLIP (clip/ in the checkpoint folder); "
                         "train one with `dalle-proto train-clip`")
    passes = {"no rerank": None} | ({f"rerank {rerank}": rerank} if rerank else {})
    reference = None
    report: dict[str, Any] = {"per_category": per_category if shapes else None, "seed": seed, "n": len(prompts),
                              "batch_size": batch_size,
                              "categories": sorted({p.category for p in prompts}, key=_category_order),
                              "sampling": _sampling_settings(pipe, cfg_scale), "passes": {}}
    for name, candidates in passes.items():
        images = sample_prompts(pipe, [p.caption for p in prompts], seed, batch_size, candidates, cfg_scale,
                                desc=f"sampling ({name})")
        if shapes and reference is None:
            size = images.shape[-1]
            reference = torch.stack([pil_to_tensor(render_caption(p.caption, seed + 1, size).image)
                                     for p in tqdm(prompts, desc="reference renders", unit="image")])
        report["passes"][name] = _pass_metrics(pipe, prompts, images, reference, seed, shapes)
        for category in report["categories"]:
            chosen = [i for i, p in enumerate(prompts) if p.category == category][:GRID_IMAGES]
            grid = make_image_grid(images[chosen], captions=[prompts[i].caption for i in chosen], columns=8)
            grid.save(_ensure(out / "grids") / f"{name.replace(' ', '_')}_{category}.png")
    report["fid_features"] = None if not shapes else (
        f"CLIP image embedding ({clip.embedding_size}-d, unit norm"
        f"{f', {clip.member_count} CLIPs joined' if clip.member_count > 1 else ''})" if clip is not None
        else "pixels average-pooled to 8x8 (192-d)")
    report["notes"] = [] if clip is not None else ["no clip/ in the checkpoint: CLIP score and R-precision skipped"]
    markdown = to_markdown(report)
    atomic_write_bytes(out / "evaluation.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "evaluation.md", markdown.encode())
    return report


def _sampling_settings(pipe: Any, cfg_scale: float | None) -> dict | None:
    """The sampling defaults the report's images were drawn with (pipeline.json, `cfg_scale` as
    overridden), so that a figure names its guidance and temperature; None when `pipe` has none."""
    config = getattr(pipe, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    settings = dataclasses.asdict(config)
    if cfg_scale is not None:
        settings["cfg_scale"] = cfg_scale
    return settings


def _category_order(category: str) -> int:
    return CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}"


def to_markdown(report: dict) -> str:
    """The report as markdown: an attribute-accuracy table (shapes) and a table of the other metrics."""
    passes = list(report["passes"])
    lines = [f"# Evaluation ({report['n']} prompts, seed {report['seed']})", ""]
    if report.get("sampling"):
        lines += ["Sampling: " + ", ".join(f"{k} {v}" for k, v in report["sampling"].items())
                  + "; one image per prompt per pass", ""]
    if "accuracy" in report["passes"][passes[0]]:
        categories = report["categories"]  # in CATEGORIES order
        header = [f"{c} (n={report['passes'][passes[0]]['accuracy'][c]['n']})" + (f", {p}" if len(passes) > 1 else "")
                  for c in categories for p in passes]
        lines += ["Attribute accuracy (shapes_evaluator; — = no prompt of the category states it):", "",
                  "| attribute | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for attribute in COLUMNS:
            cells = [_fmt(report["passes"][p]["accuracy"][c].get(attribute), percent=True)
                     for c in categories for p in passes]
            lines.append(f"| {attribute} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = []
    first = report["passes"][passes[0]]
    if "fid" in first:
        rows.append((f"FID ({report['fid_features']}; vs ground-truth renders of the prompts)", "fid", False))
    if first.get("position_diversity", {}).get("n"):
        rows.append(("position diversity (normalised entropy of the 3x3 cell, single prompts without a "
                     f"position, n={first['position_diversity']['n']})", "position_diversity", False))
    if "clip_score" in first:
        rows.append(("CLIP score (100 x mean cosine)", "clip_score", False))
        rows.append(("R-precision (top-1 among the true prompt and up to 99 others)", "r_precision", True))
    lines += ["| metric | " + " | ".join(passes) + " |", "|---" * (len(passes) + 1) + "|"]
    for label, key, percent in rows:
        values = [report["passes"][p][key] for p in passes]
        values = [v["normalised_entropy"] if isinstance(v, dict) else v for v in values]
        lines.append(f"| {label} | " + " | ".join(_fmt(v, percent) for v in values) + " |")
    lines.append("")
    if len(passes) > 1:
        lines += ["The reranker is the same CLIP that computes CLIP score and R-precision, so the reranked "
                  "pass's values of those two are flattered.", ""]
    lines += [f"Note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"
