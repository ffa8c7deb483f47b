"""Image tokenizer benchmark: train the CPU shapes VQGAN from scratch, then measure it.

    python3 benchmarks/image_tokenizer.py --fresh       # configs/shapes.yaml -> runs/shapes/image_tokenizer
    python3 benchmarks/image_tokenizer.py --out runs/x image_tokenizer_training.steps=300
    python3 benchmarks/image_tokenizer.py --measure checkpoints/shapes/image_tokenizer   # no training

It trains exactly what `dalle-proto train-image-tokenizer --config configs/shapes.yaml` trains (same
run config, same `train_image_tokenizer`, same folders under `out_dir`), then measures it.

Prints PSNR on 512 eval-split shapes renders (64 px; mean of per-image PSNR on the [0, 1] scale,
plus PSNR of the pooled MSE), codebook usage (fraction of all codes that those 512 images' tokens
use), the agreement of bf16-autocast tokens with fp32 tokens (what `encode_to_cache(bf16=True)`
costs), the shapes evaluator's whole-caption accuracy on the reconstructions (the ceiling of any
transformer sampling through this tokenizer), wall time and steps/s. Bars: PSNR >= 30 dB,
usage >= 0.9, <= 30 minutes of training.
Rerunning with the same --out resumes from its last.ckpt (`--fresh` deletes it first); the
reported minutes are then this invocation's only. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalle_proto.datasets.augmentation import pil_to_tensor  # noqa: E402
from dalle_proto.datasets.shapes import ShapesDataset  # noqa: E402
from dalle_proto.image_tokenizer import ImageTokenizer  # noqa: E402
from dalle_proto import stages  # noqa: E402
from dalle_proto.image_tokenizer_training import psnr_db  # noqa: E402
from dalle_proto.shapes_evaluator import evaluate_batch  # noqa: E402
from dalle_proto.run_config import load_run_config  # noqa: E402

EVAL_IMAGES = 512


def load_configs(paths: list[str], overrides: list[str]):
    config = load_run_config(paths, overrides)
    if config.data.kind != "shapes":
        raise SystemExit(f"{paths}: this benchmark trains on data.kind 'shapes', got {config.data.kind!r}")
    return config


@torch.no_grad()
def evaluate(model: ImageTokenizer, images: torch.Tensor, batch_size: int = 64) -> dict:
    model.eval()
    psnrs, mses, ids_fp32, ids_bf16 = [], [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]  # (B, 3, 64, 64)
        recon, ids, _ = model(x)
        psnrs.append(psnr_db(recon, x))
        mses.append(((recon.clamp(-1, 1) - x) / 2).pow(2).mean(dim=(1, 2, 3)))
        ids_fp32.append(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ids_bf16.append(model.encode(x))
    ids_fp32, ids_bf16 = torch.cat(ids_fp32), torch.cat(ids_bf16)
    counts = torch.bincount(ids_fp32.flatten(), minlength=model.codebook_size)
    return {
        "psnr_db": float(torch.cat(psnrs).mean()),
        "psnr_pooled_db": float(-10 * torch.log10(torch.cat(mses).mean())),
        "codebook_usage": float((counts > 0).float().mean()),
        "codes_used": int((counts > 0).sum()),
        "bf16_token_agreement": float((ids_fp32 == ids_bf16).float().mean()),
    }


@torch.no_grad()
def reconstruction_caption_accuracy(model: ImageTokenizer, images: torch.Tensor, captions: list[str],
                                    batch_size: int = 64) -> dict:
    """Whole-caption accuracy of the shapes evaluator on the tokenizer's reconstructions, per scene
    type: the ceiling that any transformer sampling through this tokenizer can reach."""
    model.eval()
    recon = torch.cat([model(images[i:i + batch_size])[0].clamp(-1, 1)
                       for i in range(0, len(images), batch_size)])  # (N, 3, S, S)
    report = evaluate_batch(recon, captions)
    return {"recon_caption_accuracy": report["overall"],
            **{f"recon_caption_accuracy_{kind}": figures["overall"] for kind, figures in report["by_type"].items()}}


def eval_renders(seed: int = 0, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    bench_set = ShapesDataset(EVAL_IMAGES, seed=seed, size=size, split="eval")
    images = torch.stack([pil_to_tensor(bench_set[i][0]) for i in range(EVAL_IMAGES)])  # (512, 3, S, S)
    return images, [bench_set.scene(i).caption for i in range(EVAL_IMAGES)]


def measure_only(folder: str) -> None:
    model = ImageTokenizer.from_pretrained(folder).float()  # shipped folders may hold bf16 weights
    images, captions = eval_renders(size=model.config.resolution)
    figures = {**evaluate(model, images), **reconstruction_caption_accuracy(model, images, captions)}
    print(json.dumps({"image_tokenizer": folder, **figures}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="run config YAML (repeatable); default configs/shapes.yaml")
    parser.add_argument("--out", default=None, help="the run's out_dir (default: the config's out_dir)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete out_dir/image_tokenizer_training first (train from scratch)")
    parser.add_argument("--measure", default=None, metavar="DIR",
                        help="measure this trained image tokenizer folder instead of training one")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.measure:
        measure_only(args.measure)
        return
    paths = args.config or [str(REPO / "configs" / "shapes.yaml")]
    config = load_configs(paths, args.overrides + ([f"out_dir={args.out}"] if args.out else []))
    model_config, train_config = config.image_tokenizer, config.image_tokenizer_training
    out = config.out / "image_tokenizer_training"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    resumed = (out / "last.ckpt").is_file()
    size, seed = config.data.image_size, config.data.seed
    print(f"config {paths} overrides {args.overrides}\n{model_config}\n{train_config}\n"
          f"data {config.data}, cpus {os.cpu_count()}", flush=True)

    start = time.time()
    model = stages.train_image_tokenizer(config)  # also writes out_dir/image_tokenizer
    train_seconds = time.time() - start
    steps = train_config.steps

    images, captions = eval_renders(seed, size)
    eval_start = time.time()
    figures = {**evaluate(model, images), **reconstruction_caption_accuracy(model, images, captions)}
    params = sum(p.numel() for p in model.parameters())
    result = {
        **figures,
        "train_minutes": round(train_seconds / 60, 2),
        "steps": steps,
        "steps_per_second": round(steps / train_seconds, 3) if not resumed else None,
        "batch_size": train_config.batch_size,
        "n_embed": model_config.n_embed,
        "grid_size": model_config.grid_size,
        "params_millions": round(params / 1e6, 3),
        "resumed": resumed,
        "eval_seconds": round(time.time() - eval_start, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(f"PSNR {figures['psnr_db']:.2f} dB (pooled {figures['psnr_pooled_db']:.2f} dB) on {EVAL_IMAGES} "
          f"eval renders; codebook usage {figures['codebook_usage']:.3f} ({figures['codes_used']}/"
          f"{model_config.n_embed}); bf16 token agreement {figures['bf16_token_agreement']:.4f}; "
          f"{result['train_minutes']} min for {steps} steps (load average {result['load_average_1min']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
