"""Teacher-forced probes of a shapes transformer, the data behind `binding_diagnostics.py`.

For each scene type: eval-split scenes rendered by the data set's own code, per-token labels (owner
object, ink, onset, start, raster rank, background near an object), the fp32 transformer run on
(caption, true image tokens) with each layer's attention recomputed densely (and checked against the
model's own), token losses under the true, null and perturbed captions, the caption words' attention
weights, and the two-way code choice at the first token where an alternative rendering differs.
`binding_diagnostics.py` turns these arrays into its tables; the definitions are in its docstring.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dalle_proto.attention_masks import additive_mask  # noqa: E402
from dalle_proto.caption_perturbations import CONVERSE  # noqa: E402
from dalle_proto.datasets.augmentation import pil_to_tensor  # noqa: E402
from dalle_proto.datasets.shapes import draw_objects, render_scene, sample_scene  # noqa: E402
from dalle_proto.datasets.shapes_grammar import (COLORS, NUMBERS, SHAPES, compose_caption, is_held_out,  # noqa: E402
                                                 parse_caption)

CATEGORIES = ("single", "pair", "count")
PERTURBATIONS = {"single": ("new_color", "new_shape"),
                 "pair": ("swap_colors", "swap_shapes", "new_color_1", "new_color_2", "new_shape_1", "new_shape_2",
                          "flip_relation", "reverse_order"),
                 "count": ("new_color", "new_shape", "new_number")}
ALTERNATIVES = {"single": ("recolor", "reshape"), "pair": ("swap_colors", "swap_shapes", "recolor", "reshape"),
                "count": ("recolor", "reshape")}
WORDS = {"single": ("color", "shape"), "pair": ("color_1", "shape_1", "color_2", "shape_2"),
         "count": ("number", "color", "shape")}
MAX_OBJECTS = 4


# ---- scenes, token labels, captions ----------------------------------------------------------------
def eval_scenes(category: str, count: int, seed: int) -> list:
    """The first `count` eval-split scenes of this type that hold no held-out pair."""
    scenes, index = [], 0
    while len(scenes) < count:
        _, truth = sample_scene(seed, index, split="eval")
        if truth["type"] == category and not truth["held_out"]:
            scenes.append(render_scene(seed, index, split="eval"))
        index += 1
    return scenes


def token_labels(scene, grid: int) -> dict:
    """Per image token (raster order): owner object (caption order, -1 = background), ink, onset,
    start (each object's first ink token), near (background next to an object); and each object's
    raster rank."""
    pixels = np.asarray(scene.image)  # (S, S, 3)
    cell = pixels.shape[0] // grid
    ink = (pixels != 255).any(-1).reshape(grid, cell, grid, cell).any(axis=(1, 3)).reshape(-1)  # (N,)
    edges = np.arange(grid) * cell
    areas = []
    for obj in scene.truth["objects"]:
        x0, y0, x1, y1 = obj["box"]
        ox = np.clip(np.minimum(x1, edges + cell) - np.maximum(x0, edges), 0, None)  # (g,) per column
        oy = np.clip(np.minimum(y1, edges + cell) - np.maximum(y0, edges), 0, None)  # (g,) per row
        areas.append(np.outer(oy, ox).reshape(-1))  # (N,)
    areas = np.stack(areas)  # (K, N)
    owner = np.where(areas.max(0) > 0, areas.argmax(0), -1)  # (N,)
    onset, starts = np.zeros_like(ink), np.zeros_like(ink)
    first = []
    for k in range(len(areas)):
        mine = np.flatnonzero((owner == k) & ink)
        first.append(mine[0])
        starts[mine[0]] = True
        onset |= (owner == k) & ink & (np.arange(grid * grid) // grid == mine[0] // grid)
    rank = np.full(MAX_OBJECTS, -1)
    rank[:len(first)] = np.argsort(np.argsort(first))
    taken = np.pad((owner >= 0).reshape(grid, grid), 1)
    near = np.zeros((grid, grid), dtype=bool)
    for dy in range(3):  # background tokens within one token (8-neighbourhood) of an object token
        for dx in range(3):
            near |= taken[dy:dy + grid, dx:dx + grid]
    return {"owner": owner, "ink": ink & (owner >= 0), "onset": onset, "start": starts, "rank": rank,
            "near": near.reshape(-1) & (owner < 0)}


def word_tokens(text_tokenizer, caption: str, category: str) -> list[list[int]]:
    """Text positions of each of WORDS[category] in the encoded caption (eval-mode BPE)."""
    words = caption.split()
    ends = [len(text_tokenizer.encode_ids(" ".join(words[:w + 1]))) for w in range(len(words))]
    spans = [list(range(ends[w - 1] if w else 0, ends[w])) for w in range(len(words))]
    if ends[-1] != len(text_tokenizer.encode_ids(caption)):
        raise AssertionError(f"word-by-word encoding of {caption!r} does not add up to its encoding")
    colors = [w for w, word in enumerate(words) if word in COLORS]
    shapes = [c + 1 for c in colors]  # the grammar puts the shape right after its colour
    if category == "count":
        number = next(w for w, word in enumerate(words) if word in NUMBERS)
        picks = [number, colors[0], shapes[0]]
    else:
        picks = [w for pair in zip(colors, shapes) for w in pair]
    return [spans[w] for w in picks]


def alternative(scene, change: str) -> tuple[torch.Tensor, str | None] | None:
    """The scene re-rendered with one change, boxes unchanged, and the caption that describes it
    (None where it would name a held-out pair): "swap_colors" / "swap_shapes" exchange the two
    objects' colours / shapes (None where they are equal); "recolor" / "reshape" give every object
    a colour / shape the scene does not use. -> ((3, S, S) in [-1, 1], caption), or None."""
    objects, spec = copy.deepcopy(scene.truth["objects"]), copy.deepcopy(parse_caption(scene.caption))
    key = "color" if "color" in change else "shape"
    if change.startswith("swap_"):
        if objects[0][key] == objects[1][key]:
            return None
        for group in (objects, spec["objects"]):
            group[0][key], group[1][key] = group[1][key], group[0][key]
    else:
        unused = [v for v in (COLORS if key == "color" else SHAPES) if v not in {o[key] for o in objects}]
        for obj in objects + spec["objects"]:
            obj[key] = unused[scene.truth["index"] % len(unused)]
    caption = None if any(is_held_out(o["color"], o["shape"]) for o in objects) else compose_caption(spec)
    return pil_to_tensor(draw_objects(objects, scene.image.size[0])), caption


def code_margin(logits: torch.Tensor, first: torch.Tensor, true_ids: torch.Tensor,
                alt_ids: torch.Tensor) -> np.ndarray:
    """log p(true code) - log p(alternative code) at each row's first differing token. (B,)"""
    rows = torch.arange(len(first))
    logp = logits[rows, first].float().log_softmax(-1)  # (B, Vi)
    return (logp[rows, true_ids[rows, first]] - logp[rows, alt_ids[rows, first]]).numpy()


def perturbed(caption: str, change: str, rng: np.random.Generator) -> str | None:
    """`caption` with one change (PERTURBATIONS); None where it would not differ or would name a
    held-out pair."""
    spec = copy.deepcopy(parse_caption(caption))
    objects = spec["objects"]
    if change in ("swap_colors", "swap_shapes"):
        key = change[5:-1]
        objects[0][key], objects[1][key] = objects[1][key], objects[0][key]
    elif change == "flip_relation":  # "A left of B" -> "A right of B"
        spec["relation"] = CONVERSE[spec["relation"]]
    elif change == "reverse_order":  # "A left of B" -> "B left of A"
        spec["objects"] = objects[::-1]
    elif change == "new_number":
        spec["number"] = rng.choice([n for n in NUMBERS.values() if n != spec["number"]])
    else:
        key = "color" if "color" in change else "shape"
        target = objects[int(change[-1]) - 1 if change[-1].isdigit() else 0]
        used = {o[key] for o in objects}
        target[key] = str(rng.choice([v for v in (COLORS if key == "color" else SHAPES) if v not in used]))
    text = compose_caption(spec)
    if text == caption or any(is_held_out(o["color"], o["shape"]) for o in objects):
        return None
    return text


# ---- the transformer, with its attention recomputed -------------------------------------------------
@torch.no_grad()
def forward_with_attention(model, text_ids: torch.Tensor, image_ids: torch.Tensor, verify: bool = False):
    """Teacher-forced forward that recomputes each layer's attention densely from its qkv projection
    and mask buffer. -> image logits (B, N, Vi), per layer text-key probabilities (B, H, N, T) with
    row j = the query predicting image token j, and (verify) the max abs difference of each layer's
    attention output to the model's own attention."""
    c = model.config
    t, n, h, d = c.text_len, c.image_len, c.heads, c.head_dim
    masks = model.masks()
    x = torch.cat([model._embed_text(text_ids),  # the caption after any text encoder
                   model._embed_image(image_ids) + model._image_position()], dim=1)  # (B, T+N, D)
    b, length, _ = x.shape
    text_probs, layer_diffs = [], []
    for block in model.blocks:
        attn = block.attn
        normed = block.norm_attn(x)  # (B, L, D)
        q, k, v = attn.qkv(normed).view(b, length, 3, h, d).permute(2, 0, 3, 1, 4)  # (B, H, L, dh)
        allowed = masks.get(block.kind)  # (L, L) bool, the buffer the dense path gives SDPA
        if allowed is None:  # "full" with causal text keeps no buffer: plain causal attention
            allowed = torch.ones(length, length, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5 + additive_mask(allowed).to(x.device)  # (B, H, L, L)
        probs = scores.softmax(dim=-1)
        out = attn.out((probs @ v).transpose(1, 2).reshape(b, length, h * d))  # (B, L, D)
        if verify:
            layer_diffs.append(float((out - attn(normed, masks)).abs().max()))
        text_probs.append(probs[:, :, t - 1:t + n - 1, :t])  # (B, H, N, T)
        x = x + block.post_attn(out)
        x = x + block.post_mlp(block.mlp(block.norm_mlp(x)))
    image_logits = model._image_logits(model.final_norm(x)[:, t - 1:-1])  # (B, N, Vi)
    return image_logits, text_probs, layer_diffs


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").numpy()  # (B, N)


# ---- one category ----------------------------------------------------------------------------------
WORD_TOKENS = ("ink", "start")  # which of an object's tokens the word attention is averaged over
LABELS = ("owner", "ink", "onset", "start", "rank", "near")


def word_attention(text_probs: list, picks: torch.Tensor, labels: dict) -> dict[str, np.ndarray]:
    """Per object and layer, the mean weight of its ink (start) tokens' queries on each caption word:
    {tokens: (B, K, depth, H, W)}. picks: (B, T, W) indicator of each word's text positions."""
    on_words = [torch.einsum("bhnt,btw->bhnw", p, picks) for p in text_probs]  # depth x (B, H, N, W)
    owner = torch.as_tensor(labels["owner"])  # (B, N)
    out = {}
    for key in WORD_TOKENS:
        select = torch.stack([(owner == k) & torch.as_tensor(labels[key]) for k in range(MAX_OBJECTS)], 1).float()
        select[:, :, 0] = 0  # token 0 is predicted by a text query  # (B, K, N)
        select = select / select.sum(-1, keepdim=True).clamp(min=1)
        per_object = [torch.einsum("bkn,bhnw->bkhw", select, w) for w in on_words]  # depth x (B, K, H, W)
        out[key] = torch.stack(per_object, 2).numpy()
    return out


def word_picks(text_tokenizer, captions: list[str], category: str, text_len: int) -> torch.Tensor:
    picks = torch.zeros(len(captions), text_len, len(WORDS[category]))  # (B, T, W)
    for i, caption in enumerate(captions):
        for w, span in enumerate(word_tokens(text_tokenizer, caption, category)):
            picks[i, span, w] = 1
    return picks


def caption_mass(text_probs: list, text_ids: torch.Tensor, text_vocab_size: int) -> np.ndarray:
    """Weight on all text keys, on real BPE positions and on pads, head mean: (B, 3, depth, N)."""
    real = (text_ids < text_vocab_size).float()[:, None, None, :]  # (B, 1, 1, T)
    mass = [torch.stack([p.sum(-1), (p * real).sum(-1), (p * (1 - real)).sum(-1)]).mean(2)  # (3, B, N)
            for p in text_probs]
    return torch.stack(mass, 2).permute(1, 0, 2, 3).numpy()


def first_difference_choices(pipe, category: str, batch: list, image_ids: torch.Tensor, logits: dict) -> dict:
    """For each alternative rendering (ALTERNATIVES): the first token whose code differs from the
    scene's, and there log p(true code) - log p(alternative's code) under the true, null and
    alternative's caption; the context up to that token is the same for both renderings, so which
    code the caption prefers is a clean two-way choice. -> {"choice_<change>": (B, 4) [token (-1: no
    difference), margins], "recode_color" / "recode_shape": (B, N) codes changed by recolouring /
    reshaping every object}."""
    model, text_tokenizer = pipe.transformer, pipe.text_tokenizer
    out = {}
    for change in ALTERNATIVES[category]:
        made = [alternative(s, change) for s in batch]
        rows = [i for i, m in enumerate(made) if m is not None]
        alt_ids = image_ids.clone()
        if rows:
            alt_ids[rows] = pipe.image_tokenizer.encode(torch.stack([made[i][0] for i in rows])).flatten(1)
        changed = alt_ids != image_ids  # (B, N)
        if change in ("recolor", "reshape"):
            out[f"recode_{'color' if change == 'recolor' else 'shape'}"] = changed.numpy()
        first = changed.int().argmax(1)  # (B,) first differing token (0 where none: masked below)
        valid = changed.any(1).numpy()
        margins = [code_margin(logits[cond], first, image_ids, alt_ids) for cond in ("true", "null")]
        margins.append(np.full(len(batch), np.nan))
        captioned = [i for i in rows if made[i][1] is not None and valid[i]]
        if captioned:
            _, alt_logits = model(text_tokenizer.encode([made[i][1] for i in captioned]), image_ids[captioned])
            margins[2][captioned] = code_margin(alt_logits, first[captioned], image_ids[captioned],
                                                alt_ids[captioned])
        token = np.where(valid, first.numpy(), -1).astype(float)
        out[f"choice_{change}"] = np.stack([token] + [np.where(valid, m, np.nan) for m in margins], 1)  # (B, 4)
    return out


def perturbation_runs(model, text_tokenizer, category: str, batch: list, image_ids: torch.Tensor,
                      labels: dict, seed: int) -> tuple[dict, dict]:
    """Per PERTURBATIONS caption: token losses (B, N), NaN where it does not apply; and for the
    exchanges the word attention under the exchanged caption ({"words_<tokens>_<change>": ...})."""
    c = model.config
    ce, words = {}, {}
    for number, change in enumerate(PERTURBATIONS[category]):
        texts = [perturbed(s.caption, change, np.random.default_rng([seed, s.truth["index"], number]))
                 for s in batch]  # a scene's perturbation does not depend on the batching
        rows = [i for i, text in enumerate(texts) if text is not None]
        ce[change] = np.full((len(batch), c.image_len), np.nan)
        exchange = change in ("swap_colors", "swap_shapes")
        if exchange:
            for key in WORD_TOKENS:
                words[f"words_{key}_{change}"] = np.full((len(batch), MAX_OBJECTS, c.depth, c.heads,
                                                          len(WORDS[category])), np.nan)
        if not rows:
            continue
        pert_ids = text_tokenizer.encode([texts[i] for i in rows])
        if exchange:
            pert_logits, pert_probs, _ = forward_with_attention(model, pert_ids, image_ids[rows])
            picks = word_picks(text_tokenizer, [texts[i] for i in rows], category, c.text_len)
            for key, values in word_attention(pert_probs, picks, {k: v[rows] for k, v in labels.items()}).items():
                words[f"words_{key}_{change}"][rows] = values
        else:
            _, pert_logits = model(pert_ids, image_ids[rows])
        ce[change][rows] = token_ce(pert_logits, image_ids[rows])
    return ce, words


@torch.inference_mode()
def run_category(pipe, category: str, count: int, seed: int, batch_size: int) -> tuple[dict, dict]:
    """All probes over `count` scenes of one type: (per-scene arrays keyed as `summarise` in
    binding_diagnostics.py reads them, the attention recomputation's check on the first batch)."""
    model, text_tokenizer = pipe.transformer, pipe.text_tokenizer
    c = model.config
    scenes = eval_scenes(category, count, seed)
    rec: dict[str, list] = {}
    verify = None
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start:start + batch_size]
        captions = [s.caption for s in batch]
        images = torch.stack([pil_to_tensor(s.image) for s in batch])  # (B, 3, S, S)
        image_ids = pipe.image_tokenizer.encode(images).flatten(1)  # (B, N)
        text_ids = text_tokenizer.encode(captions)  # (B, T)
        every = [token_labels(s, c.image_grid) for s in batch]
        labels = {key: np.stack([lab[key] for lab in every]) for key in LABELS}
        logits, text_probs, diffs = forward_with_attention(model, text_ids, image_ids, verify=verify is None)
        if verify is None:
            _, reference = model(text_ids, image_ids)  # the model's own (block-sparse) forward
            verify = {"layer_output_max_abs_diff": max(diffs),
                      "logits_max_abs_diff": float((logits - reference).abs().max()),
                      "logits_max_abs": float(reference.abs().max())}
        _, null_logits = model(model.null_text_ids(len(batch)), image_ids)
        ce, exchanged_words = perturbation_runs(model, text_tokenizer, category, batch, image_ids, labels, seed)
        ce |= {"true": token_ce(logits, image_ids), "null": token_ce(null_logits, image_ids)}
        picks = word_picks(text_tokenizer, captions, category, c.text_len)
        found = {**labels, **{f"ce_{cond}": v for cond, v in ce.items()}, **exchanged_words,
                 **{f"words_{key}_true": v for key, v in word_attention(text_probs, picks, labels).items()},
                 **first_difference_choices(pipe, category, batch, image_ids, {"true": logits, "null": null_logits}),
                 "mass": caption_mass(text_probs, text_ids, c.text_vocab_size),
                 "vertical": np.array([" above " in cap or " below " in cap for cap in captions])}
        for key, values in found.items():
            rec.setdefault(key, []).append(values)
        print(f"  {category}: {start + len(batch)}/{len(scenes)} scenes", file=sys.stderr, flush=True)
    data = {key: np.concatenate(v) for key, v in rec.items()}
    data["ce"] = {key[3:]: data.pop(key) for key in list(data) if key.startswith("ce_")}
    return data, verify
