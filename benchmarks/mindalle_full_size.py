"""The full-size minDALL-E path on this machine: convert a 1.3B release, then sample it.

    python3 benchmarks/mindalle_full_size.py --work /tmp/mindalle_full      # ~6 GB there per folder
    python3 benchmarks/mindalle_full_size.py --work /tmp/mindalle_full --reference   # + minDALL-E's own sampler
    python3 benchmarks/mindalle_full_size.py --work /tmp/mindalle_full --only reference

The real release cannot be downloaded here, so the script writes a random-weight one in its exact
layout and size (`WORK/1.3B`: config.yaml with minDALL-E's defaults, a CharBPE tokenizer of 16,383
ids + [PAD] trained on made-up words, stage1_last.ckpt with taming's f16 VQGAN of 16,384 codes and
stage2_last.ckpt with the 42-layer, 1536-wide Transformer1d, fp32, as `{"state_dict": ...}`), once.
Then, each in a process of its own (wall time and peak resident memory from wait4):
- convert: `dalle-proto convert mindalle WORK/1.3B WORK/converted` (fp32 kept);
- sample: `DallePipeline.from_pretrained(WORK/converted)` (bf16 weights, the default), one prompt,
  `--batch` images at minDALL-E's defaults (top-k 256, temperature 1, no guidance), 256 px pixels
  included; a greedy warm-up of one image first, not timed;
- reference (`--reference`): minDALL-E's own sampler (tests/mindalle_reference.py, `past` cache, fp32)
  on the release's weights, `--batch` images, codes only.
Random weights sample noise, but at the real width every step costs what the real model's does.
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

PROMPT = "a painting of a cat with sunglasses in the frame"


def write_release(folder: Path, seed: int = 0) -> None:
    """A random-weight release in minDALL-E's layout and size (see the module docstring)."""
    import numpy as np
    from omegaconf import OmegaConf
    from tokenizers import CharBPETokenizer

    import mindalle_reference as ref
    from dalle_proto.mindalle import DEFAULTS

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    rng = np.random.default_rng(seed)  # made-up words: enough pairs for 16k merges
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(300_000)]
    bpe = CharBPETokenizer(unk_token="[UNK]", lowercase=True)
    bpe.train_from_iterator([" ".join(words[i:i + 20]) for i in range(0, len(words), 20)], vocab_size=16383,
                            min_frequency=1, special_tokens=["[UNK]"], show_progress=False)
    bpe.save_model(str(tmp / "tokenizer"), "bpe-16k")
    vocab_txt = ref.build_tokenizer(str(tmp / "tokenizer")).get_vocab_size()
    config = {"dataset": dict(DEFAULTS["dataset"]), "stage1": DEFAULTS["stage1"],
              "stage2": DEFAULTS["stage2"] | {"vocab_size_txt": vocab_txt}}
    OmegaConf.save(OmegaConf.create(config), tmp / "config.yaml")
    s1, s2 = config["stage1"], config["stage2"]
    h1 = {k: v for k, v in s1["hparams"].items() if k not in ("double_z", "pdrop")}
    h2 = s2["hparams"]
    torch.manual_seed(seed)
    with torch.device("meta"):  # no default init of 1.3B parameters: filled below
        stage1 = ref.VQGAN(s1["n_embed"], s1["embed_dim"], **h1)
        stage2 = ref.Transformer1d(vocab_txt, s2["vocab_size_img"], h2["embed_dim"], h2["n_layers"], h2["n_heads"],
                                   h2["ctx_len_img"], h2["ctx_len_txt"])
    for name, model in (("stage1", stage1), ("stage2", stage2)):
        model.to_empty(device="cpu")
        with torch.no_grad():
            for key, p in model.named_parameters():
                norm = isinstance(model.get_submodule(key.rpartition(".")[0]), (torch.nn.LayerNorm, torch.nn.GroupNorm))
                p.fill_(1.0 if key.endswith("weight") else 0.0) if norm else p.normal_(0.0, 0.02)
        torch.save({"state_dict": model.state_dict()}, tmp / f"{name}_last.ckpt")
        del model
    os.replace(tmp, folder)


def run_measured(argv: list[str]) -> tuple[str, float, float]:
    """(stdout, wall s, peak RSS GiB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    return out, time.perf_counter() - start, usage.ru_maxrss / 2**20


def sample_child(folder: str, batch: int, threads: int) -> dict:
    from dalle_proto import DallePipeline

    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = DallePipeline.from_pretrained(folder)  # bf16 transformer, fp32 VQGAN
    load = time.perf_counter() - start
    pipe([PROMPT], num_images=1, temperature=0, seed=0)  # warm-up
    start = time.perf_counter()
    images = pipe([PROMPT], num_images=batch, seed=0)
    elapsed = time.perf_counter() - start
    return {"load_s": round(load, 1), "images": len(images), "image_size": list(images[0].size),
            "sample_s": round(elapsed, 1), "s_per_image": round(elapsed / batch, 2),
            "params_millions": round(pipe.transformer.num_parameters() / 1e6, 1),
            "weights_dtype": str(pipe.transformer.image_head.weight.dtype)}


def reference_child(release: str, batch: int, threads: int) -> dict:
    import mindalle_reference as ref
    from dalle_proto.mindalle import STAGE2_FILE, find_release_files, read_config, read_state_dict

    torch.set_num_threads(threads)
    files = find_release_files(release)
    cfg = read_config(files["config.yaml"])
    s2, h = cfg["stage2"], cfg["stage2"]["hparams"]
    with torch.device("meta"):
        model = ref.Transformer1d(s2["vocab_size_txt"], s2["vocab_size_img"], h["embed_dim"], h["n_layers"],
                                  h["n_heads"], h["ctx_len_img"], h["ctx_len_txt"])
    model.load_state_dict(read_state_dict(files[STAGE2_FILE]), assign=True)
    ctx = h["ctx_len_img"] + h["ctx_len_txt"]
    for module in model.modules():  # the causal masks are buffers outside the state dict: still on meta
        if isinstance(module, ref.MultiHeadSelfAttention):
            module.mask = torch.tril(torch.ones(ctx, ctx)).view(1, ctx, ctx)
    tokenizer = ref.build_tokenizer(str(files["config.yaml"].parent / "tokenizer"))
    text = torch.tensor([tokenizer.encode(PROMPT).ids] * batch)  # (B, 64)
    torch.manual_seed(0)
    start = time.perf_counter()
    ref.sampling(model.eval(), text, top_k=256, max_seq_len=h["ctx_len_img"])
    elapsed = time.perf_counter() - start
    return {"sample_s": round(elapsed, 1), "s_per_image": round(elapsed / batch, 2), "weights_dtype": "float32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mindalle_full")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also time minDALL-E's own sampler (fp32)")
    parser.add_argument("--only", choices=["reference"], help="time only minDALL-E's sampler (a converted run "
                                                              "done before)")
    parser.add_argument("--child", choices=["sample", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = sample_child if args.child == "sample" else reference_child
        print(json.dumps(fn(args.folder, args.batch, args.threads)))
        return
    work = Path(args.work)
    release, converted = work / "1.3B", work / "converted"
    result: dict = {"machine": os.uname().machine, "threads": args.threads, "batch": args.batch,
                    "torch": torch.__version__}
    if not (release / "stage2_last.ckpt").is_file():
        start = time.perf_counter()
        write_release(release)
        result["write_release_s"] = round(time.perf_counter() - start, 1)
    result["release_gib"] = round(sum(p.stat().st_size for p in release.rglob("*") if p.is_file()) / 2**30, 2)
    if args.only is None:
        shutil.rmtree(converted, ignore_errors=True)
        dalle_proto = shutil.which("dalle-proto") or "dalle-proto"
        out, wall, peak = run_measured([dalle_proto, "convert", "mindalle", str(release), str(converted)])
        print(out.strip(), file=sys.stderr)
        result["convert"] = {"wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2), "out_gib": round(
            sum(p.stat().st_size for p in converted.rglob("*") if p.is_file()) / 2**30, 2)}
    children = [args.only] if args.only else ["sample"] + (["reference"] if args.reference else [])
    for child in children:
        folder = converted if child == "sample" else release
        out, wall, peak = run_measured([sys.executable, __file__, "--child", child, "--folder", str(folder),
                                        "--batch", str(args.batch), "--threads", str(args.threads)])
        result[child] = json.loads(out.strip().splitlines()[-1]) | {"peak_rss_gib": round(peak, 2)}
        print(f"{child}: {result[child]}", file=sys.stderr, flush=True)
    if "sample" in result and "reference" in result:  # ours include decoding to pixels; the reference: codes only
        result["pipeline_vs_reference_s_per_image"] = round(
            result["reference"]["s_per_image"] / result["sample"]["s_per_image"], 3)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
