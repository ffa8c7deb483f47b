"""How large a model's image logits are, and what bf16 costs them: teacher-forced image-token
cross-entropy on the first --n sequences of a token cache, with fp32 and bf16 weights.

    python benchmarks/logit_scale.py --checkpoint runs/CP_x --token-cache runs/mix/token_cache/eval

For a `transformer.code_pixels` model it also reports the head's pixel term before it is centred
over codes (`DalleTransformer._image_head_weight`): the norm of its mean row against its mean row
norm (a part shared by all rows shifts every logit alike, so no gradient holds it), and the "raw"
cross-entropy and max |logit| with that shared part left in, as the code before the centring computed
them. bf16 resolves numbers near 128-256 to 1.0. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.token_cache import TokenCache  # noqa: E402


@torch.no_grad()
def measure(model, text: torch.Tensor, image: torch.Tensor, batch: int = 32) -> dict:
    losses, largest = [], 0.0
    for i in range(0, len(text), batch):
        _, logits = model(text[i:i + batch], image[i:i + batch])  # (b, N, Vi)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), image[i:i + batch].flatten(), reduction="sum"))
        largest = max(largest, float(logits.float().abs().max()))
    return {"image_ce": round(float(torch.stack(losses).sum()) / image.numel(), 5), "max_abs_logit": round(largest, 1)}


def raw_head_weight(model) -> torch.Tensor:  # (Vi, D): the head rows with the pixel term not centred
    return model.image_head.weight + model.code_pixel_out(model.code_pixel_values.to(model.image_head.weight.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model folder")
    parser.add_argument("--token-cache", required=True, help="a token cache folder, e.g. runs/x/token_cache/eval")
    parser.add_argument("--n", type=int, default=256, help="sequences (default 256)")
    args = parser.parse_args()
    cache = TokenCache(args.token_cache)
    items = [cache[i] for i in range(min(args.n, len(cache)))]
    result = {"checkpoint": args.checkpoint, "token_cache": args.token_cache, "n": len(items)}
    for dtype in ("float32", "bfloat16"):
        pipe = DallePipeline.from_pretrained(args.checkpoint, device="cpu", dtype=getattr(torch, dtype))
        model = pipe.transformer
        text = pipe.text_tokenizer.encode([caption for _, caption in items])  # (n, T)
        image = torch.stack([tokens.flatten() for tokens, _ in items]).long()  # (n, N)
        result[dtype] = measure(model, text, image)
        if model.config.code_pixels and model.code_pixel_out is not None:
            if dtype == "float32":
                with torch.no_grad():
                    rows = model.code_pixel_out(model.code_pixel_values)  # (Vi, D)
                result["pixel_term_mean_row_norm"] = round(float(rows.norm(dim=1).mean()), 3)
                result["pixel_term_norm_of_mean_row"] = round(float(rows.mean(dim=0).norm()), 3)
            model._image_head_weight = lambda: raw_head_weight(model)  # this instance only
            result[f"{dtype}_raw"] = measure(model, text, image)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
