"""`dalle-proto`: the command line for each step of the data flow.

    dalle-proto data shapes --out data/shapes --count 1000
    dalle-proto train-text-tokenizer --config configs/shapes.yaml
    dalle-proto train-image-tokenizer --config configs/shapes.yaml
    dalle-proto encode --config configs/shapes.yaml
    dalle-proto train --config configs/shapes.yaml transformer.depth=4
    dalle-proto train-clip --config configs/shapes.yaml
    dalle-proto generate "a red circle to the left of a blue square" --out samples.png
    dalle-proto evaluate --checkpoint runs/shapes --rerank 8 --out runs/shapes/evaluation
    dalle-proto export runs/shapes checkpoints/shapes
    dalle-proto convert mindalle 1.3B models/mindalle    # kakaobrain's minDALL-E as a model folder

Training stages share one run config (YAML + `key.sub=value` overrides) and chain through its
`out_dir`: each stage reads what the previous one wrote there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _add_run_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="run config YAML (repeatable; later files override earlier ones)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. transformer.depth=4 training.steps=100")


def _load_run_config(args: argparse.Namespace):
    from .run_config import load_run_config

    return load_run_config(args.config, args.overrides)


def cmd_data_shapes(args: argparse.Namespace) -> None:
    from .datasets.shapes import write_shapes

    out = write_shapes(args.out, args.count, seed=args.seed, size=args.size, split=args.split)
    print(f"wrote {args.count} {args.split}-split scenes to {out}")


def cmd_data_emoji(args: argparse.Namespace) -> None:
    from .datasets.emoji import write_emoji

    out = write_emoji(args.out, image_size=args.size, limit=args.limit)
    print(f"wrote OpenMoji emoji to {out} (CC BY-SA 4.0: see {Path(out) / 'ATTRIBUTION.md'})")


def cmd_show_config(args: argparse.Namespace) -> None:
    from .config import config_to_yaml

    print(config_to_yaml(_load_run_config(args)), end="")


def cmd_stage(args: argparse.Namespace) -> None:
    from . import stages

    config = _load_run_config(args)
    stages.check_overrides(args.stage, config, args.overrides)
    try:
        getattr(stages, args.stage)(config)
    except (FileNotFoundError, ValueError) as e:  # a missing part, a bad saved file, parts that disagree
        raise SystemExit(f"dalle-proto: error: {e}") from None


DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes"


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .image_grid import make_image_grid
    from .pipeline import DallePipeline

    model = Path(args.model)
    if not model.is_dir():
        raise SystemExit(
            f"dalle-proto: error: no trained model at {model}. Train one (a run's out_dir is a model "
            "folder): `dalle-proto train-text-tokenizer --config CONFIG out_dir=DIR`, then "
            "train-image-tokenizer, encode and train with the same arguments, and pass `--model DIR`; "
            f"or copy a trained model folder to {DEFAULT_MODEL}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = DallePipeline.from_pretrained(model, device=device)
        images = pipe(args.prompts, num_images=args.num_images, seed=args.seed, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale, rerank=args.rerank,
                      progress=True, cfg_schedule=args.cfg_schedule)
    except (FileNotFoundError, ValueError) as e:  # bad folder, mismatched parts, bad prompt or setting
        raise SystemExit(f"dalle-proto: error: {e}") from None
    captions = [p for p in args.prompts for _ in range(args.num_images)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, captions=captions, columns=args.num_images).save(out)
    print(out)


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .pipeline import DallePipeline

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        pipe = DallePipeline.from_pretrained(args.run, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"dalle-proto: error: {e}") from None
    _override_sampling_defaults(pipe, args, ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p"))
    folder = pipe.save_pretrained(args.out, dtype=dtype)
    print(f"{args.run} -> {folder} ({args.dtype} weights; sampling defaults {pipe.config})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from .evaluation import evaluate_pipeline, to_markdown
    from .pipeline import DallePipeline

    captions = None
    if args.captions:
        captions = [line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "evaluation"
    try:
        pipe = DallePipeline.from_pretrained(args.checkpoint, device=device)
        _override_sampling_defaults(pipe, args, ("cfg_scale", "cfg_schedule", "temperature"))
        report = evaluate_pipeline(pipe, out, per_category=args.per_category, seed=args.seed, rerank=args.rerank,
                                   batch_size=args.batch_size, captions=captions, categories=args.categories)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"dalle-proto: error: {e}") from None
    print(to_markdown(report), end="")
    print(f"report -> {out / 'evaluation.md'}, {out / 'evaluation.json'}, grids in {out / 'grids'}")


def cmd_convert_mindalle(args: argparse.Namespace) -> None:
    import time

    import torch

    from .mindalle import convert_mindalle

    dtype = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    start = time.perf_counter()
    try:
        folder = convert_mindalle(args.src, args.out, dtype=dtype)
    except (OSError, ValueError) as e:  # a missing or bad release file, an existing OUT
        raise SystemExit(f"dalle-proto: error: {e}") from None
    print(f"{args.src} -> {folder} in {time.perf_counter() - start:.1f} s "
          f"(load it with --model {folder}; stage-2 weights are CC BY-NC-SA 4.0)")


def _override_sampling_defaults(pipe: Any, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """The options among `names` that were given replace pipe.config's (pipeline.json's) defaults."""
    for name in names:
        if getattr(args, name) is not None:
            setattr(pipe.config, name, getattr(args, name))


def _add_cfg_schedule(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None,  # sampling.CFG_SCHEDULES
                        help="guidance over the image tokens: constant, or a linear ramp from 1 to --cfg-scale "
                             f"(default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-proto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="write a data set to disk")
    data_sub = data.add_subparsers(dest="data_kind", required=True, metavar="KIND")
    shapes = data_sub.add_parser("shapes", help="render the procedural shapes set (SHAPES.md)")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--count", type=int, required=True, help="number of scenes")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--split", choices=["train", "eval"], default="train",
                        help="train never contains a held-out colour-shape pair; eval includes them")
    shapes.set_defaults(func=cmd_data_shapes)
    emoji = data_sub.add_parser("emoji", help="rasterise OpenMoji emoji with their names (needs .[emoji])")
    emoji.add_argument("--out", required=True, help="output folder")
    emoji.add_argument("--size", type=int, default=64, help="image side in pixels")
    emoji.add_argument("--limit", type=int, default=None, help="write at most this many")
    emoji.set_defaults(func=cmd_data_emoji)

    show = sub.add_parser("config", help="print the resolved run config")
    _add_run_config_args(show)
    show.set_defaults(func=cmd_show_config)

    stage_help = {
        "train_text_tokenizer": "train the BPE text tokenizer on the data set's captions",
        "train_image_tokenizer": "train the VQGAN image tokenizer",
        "encode": "encode the data set once into an image-token cache",
        "train": "train the transformer on the token cache",
        "train_clip": "train the CLIP reranker on the data set's image-caption pairs (writes out_dir/clip)",
    }
    for stage, help_text in stage_help.items():
        p = sub.add_parser(stage.replace("_", "-"), help=help_text, description=help_text)
        _add_run_config_args(p)
        p.set_defaults(func=cmd_stage, stage=stage)

    gen_help = "draw images for captions with a trained model and save them as one grid PNG"
    gen = sub.add_parser("generate", help=gen_help, description=(
        f"{gen_help}: one row of --num-images images per caption, the caption under each image. "
        "Sampling settings left out come from the model folder's pipeline.json (else cfg-scale 3, "
        "temperature 1, no top-k/top-p)."), epilog=(
        'example: dalle-proto generate "a red circle to the left of a blue square" --num-images 8 '
        "--out samples.png"))
    gen.add_argument("prompts", nargs="+", metavar="CAPTION", help="caption(s), e.g. \"a red circle\"")
    gen.add_argument("--num-images", type=int, default=4, help="images per caption (default: 4)")
    gen.add_argument("--out", default="samples.png", help="grid PNG to write (default: samples.png)")
    gen.add_argument("--model", default=str(DEFAULT_MODEL),
                     help="model folder: text_tokenizer/, image_tokenizer/, transformer/ (optional clip/, "
                          "pipeline.json); a training run's out_dir is one (default: checkpoints/shapes)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same images (default: 0)")
    gen.add_argument("--cfg-scale", type=float, default=None,
                     help="classifier-free guidance scale; 1 turns guidance off")
    _add_cfg_schedule(gen, default="the model's pipeline.json")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest image tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass")
    gen.add_argument("--rerank", type=int, default=None, metavar="N",
                     help="draw N candidates per image and keep the one the model's CLIP (clip/) scores best")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.set_defaults(func=cmd_generate)

    ev_help = "score a trained model on a fixed shapes prompt set: attribute accuracy, FID, CLIP metrics"
    ev = sub.add_parser("evaluate", help=ev_help, description=ev_help + " (see dalle_proto/evaluation.py)")
    ev.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="model folder: text_tokenizer/, image_tokenizer/, transformer/, optional clip/")
    ev.add_argument("--rerank", type=int, default=None, metavar="N",
                    help="also evaluate with N CLIP-reranked candidates per image, side by side")
    ev.add_argument("--per-category", type=int, default=200, help="prompts per category (default: 200)")
    ev.add_argument("--out", default=None, help="report folder (default: DIR/evaluation)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=32, help="prompts sampled at a time")
    ev.add_argument("--cfg-scale", type=float, default=None, help="default: the model's pipeline.json")
    _add_cfg_schedule(ev, default="the model's pipeline.json")
    ev.add_argument("--temperature", type=float, default=None, help="default: the model's pipeline.json")
    ev.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY",
                    help="only these categories of the shapes prompt set: single, pair, count, held_out "
                         "(default: all)")
    ev.add_argument("--captions", default=None, metavar="FILE",
                    help="non-shapes models: sample these captions (one per line) instead and report "
                         "only CLIP score and R-precision")
    ev.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ev.set_defaults(func=cmd_evaluate)

    ex_help = "copy a trained model folder (e.g. a run's out_dir) to a small shippable one"
    ex = sub.add_parser("export", help=ex_help, description=ex_help + ": text_tokenizer/, image_tokenizer/, "
                        "transformer/, clip/ if present, and pipeline.json; no training state")
    ex.add_argument("run", metavar="DIR", help="model folder to read, e.g. runs/shapes")
    ex.add_argument("out", metavar="OUT", help="folder to write, e.g. checkpoints/shapes")
    ex.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="weight dtype on disk (default: bfloat16, half the size)")
    ex.add_argument("--cfg-scale", type=float, default=None,
                    help="default guidance scale to write to pipeline.json (pick one with "
                         "benchmarks/guidance_sweep.py); default: keep the source folder's")
    _add_cfg_schedule(ex, default="keep the source folder's")
    ex.add_argument("--temperature", type=float, default=None, help="default sampling temperature for pipeline.json")
    ex.add_argument("--top-k", type=int, default=None, help="default top-k for pipeline.json")
    ex.add_argument("--top-p", type=float, default=None, help="default top-p for pipeline.json")
    ex.set_defaults(func=cmd_export)

    conv = sub.add_parser("convert", help="import a released third-party model as a model folder")
    conv_sub = conv.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    md_help = "kakaobrain's minDALL-E 1.3B (the unpacked 1.3B.tar.gz) -> a model folder"
    md = conv_sub.add_parser("mindalle", help=md_help, description=md_help + " (see dalle_proto/mindalle.py)")
    md.add_argument("src", metavar="SRC", help="the unpacked release: config.yaml, tokenizer/, stage1_last.ckpt, "
                                               "stage2_last.ckpt (or the folder holding 1.3B/)")
    md.add_argument("out", metavar="OUT", help="model folder to write (must not exist or be empty)")
    md.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                    help="weight dtype on disk (default: keep the checkpoints')")
    md.set_defaults(func=cmd_convert_mindalle)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        args.func(args)
    except ConfigError as e:  # a typo in a config is the user's to fix: no traceback needed
        raise SystemExit(f"dalle-proto: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
