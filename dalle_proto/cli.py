"""`dalle-proto`: the command line for each step of the data flow.

    dalle-proto data shapes --out data/shapes --count 1000
    dalle-proto train-text-tokenizer --config configs/shapes.yaml
    dalle-proto train-image-tokenizer --config configs/shapes.yaml
    dalle-proto encode --config configs/shapes.yaml
    dalle-proto train --config configs/shapes.yaml transformer.depth=4
    dalle-proto generate "a red circle to the left of a blue square" --out samples.png

Training stages share one run config (YAML + `key.sub=value` overrides) and chain through its
`out_dir`: each stage reads what the previous one wrote there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    getattr(stages, args.stage)(config)


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
    }
    for stage, help_text in stage_help.items():
        p = sub.add_parser(stage.replace("_", "-"), help=help_text, description=help_text)
        _add_run_config_args(p)
        p.set_defaults(func=cmd_stage, stage=stage)
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
