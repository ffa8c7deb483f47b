"""Transformer benchmark on the peer configuration of ../shared/REFERENCE.md.

    python3 benchmarks/transformer.py                   # train + sample, bf16 autocast and fp32
    python3 benchmarks/transformer.py --only sample --dtypes bf16
    python3 benchmarks/transformer.py --only train --dtypes bf16 --shapes --dim 128 --heads 4   # configs/shapes.yaml

Model: `TransformerConfig.from_size("peer")` (dim 256, depth 8, heads 8 x 32, text 64 tokens over
1024 BPE ids, image 16x16 tokens over 512 codes) with the paper's sparse attention (row / column /
conv layers).

- train: batch 16, one step = forward + backward + grad-norm clip + AdamW step, exactly the
  computation of `TransformerLightningModule.training_step` without Lightning's bookkeeping
  (the peer's bench.py times the same plain loop). Median over `--iters` steps after `--warmup`.
- sample: batch 8, all 256 image tokens with the KV cache (`sampling.generate_image_tokens`),
  top-k over 10% of the image vocabulary (dalle-pytorch's `filter_thres=0.9`), no guidance;
  "bf16" samples with a bf16 copy of the weights (no autocast), "fp32" with the fp32 weights.
- malloc: like the training stages, the script first calls `cpu_memory.retain_freed_memory()`
  (glibc keeps freed activation buffers instead of page-faulting them in again every step);
  `--default-malloc` measures without it.
- peak: this machine's measured matmul throughput (n = 2048, fp32 and bf16) and the fraction of it
  the training step reaches (FLOPs: 6 x matmul parameters x tokens + attention over the blocks the
  sparse layers compute).

Speed is machine-bound: compare with dalle-pytorch timed in the same session on the same machine
(../shared/peer/README.md). Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalle_proto.cpu_memory import retain_freed_memory  # noqa: E402
from dalle_proto.sampling import generate_image_tokens  # noqa: E402
from dalle_proto.transformer import DalleTransformer, TransformerConfig  # noqa: E402
from dalle_proto.transformer_training import optimizer_param_groups  # noqa: E402

TRAIN_BATCH, SAMPLE_BATCH = 16, 8


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def matmul_gflops(dtype: torch.dtype, n: int = 2048, iters: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def train_flops(model: DalleTransformer, batch: int) -> float:
    """FLOPs of one training step: 6 x (matmul parameters) x tokens + 3 x forward attention matmuls."""
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and "embedding" not in n and n not in ("text_position", "image_row",
                                                                                "image_column"))
    tokens = batch * (c.text_len + c.image_len)
    inner = c.heads * c.head_dim
    t, n = c.text_len, c.image_len
    attention = 0
    for kind in model.kinds:  # query x key pairs each layer actually computes
        if kind == "full":
            pairs = (t + n) * (t + n) // 2
        else:
            window = model.masks()[f"{kind}_image_bias"].shape[2]
            pairs = t * t // 2 + n * (t + window)
        attention += 2 * 2 * pairs * inner  # QK^T and AV
    return 6 * matmul_params * tokens + 3 * batch * attention


def bench_train(model: DalleTransformer, dtype: str, warmup: int, iters: int, batch: int = TRAIN_BATCH,
                compile: bool = False) -> dict:
    c = model.config
    model.train()
    opt = torch.optim.AdamW(optimizer_param_groups(model, 4.5e-2), lr=1e-4, betas=(0.9, 0.96), eps=1e-8,
                            fused=True)  # as TransformerLightningModule.configure_optimizers
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, c.text_total_vocab, (batch, c.text_len), generator=g)
    image = torch.randint(0, c.image_vocab_size, (batch, c.image_len), generator=g)
    loss_fn = torch.compile(model.loss) if compile else model.loss

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss, _ = loss_fn(text, image)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"train_samples_per_s": batch / med, "train_samples_per_s_best": batch / min(times),
            "train_step_s_median": med}


def bench_sample(model: DalleTransformer, dtype: str, warmup: int, iters: int) -> dict:
    c = model.config
    # inference needs no fp32 master weights: bf16 sampling runs a bf16 copy of the model (as
    # DallePipeline does on the CPU), which halves the weight bytes read per token and the casts
    model = copy.deepcopy(model).to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    text = torch.randint(0, c.text_vocab_size, (SAMPLE_BATCH, c.text_len), generator=torch.Generator().manual_seed(1))
    top_k = max(1, int(0.1 * c.image_vocab_size))
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        tokens = generate_image_tokens(model, text, top_k=top_k, seed=i)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    assert tokens.shape == (SAMPLE_BATCH, c.image_grid, c.image_grid)
    med = statistics.median(times)
    n = SAMPLE_BATCH * c.image_len
    return {"sample_image_tokens_per_s": n / med, "sample_image_tokens_per_s_best": n / min(times),
            "sample_s_median": med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "sample"], default=None)
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--attention", default="sparse", help="sparse | full | row | column | conv")
    parser.add_argument("--shapes", action="store_true",
                        help="the shapes run's text instead of the peer's: 16 positions over configs/shapes.yaml's "
                             "387 BPE ids, read as a prefix LM (text_attention bidirectional, no text loss)")
    parser.add_argument("--dim", type=int, default=None, help="model width (default: the peer's 256)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads of 32 (default: the peer's 8)")
    parser.add_argument("--depth", type=int, default=None, help="layers (default: the peer's 8)")
    parser.add_argument("--batch", type=int, default=TRAIN_BATCH, help=f"training batch (default: {TRAIN_BATCH})")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="skip cpu_memory.retain_freed_memory(), which every training stage calls")
    args = parser.parse_args()
    retained = False if args.default_malloc else retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {k: getattr(args, k) for k in ("dim", "heads", "depth") if getattr(args, k) is not None}
    if args.shapes:
        overrides.update(text_len=16, text_vocab_size=387, text_attention="bidirectional", text_loss_weight=0.0)
    model = DalleTransformer(TransformerConfig.from_size("peer", attention=args.attention, **overrides))
    result: dict = {"attention": args.attention, "overrides": overrides, "batch": args.batch,
                    "compile": args.compile, "threads": torch.get_num_threads(),
                    "params_millions": round(model.num_parameters() / 1e6, 3), "torch": torch.__version__,
                    "retain_freed_memory": retained}
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    result.update(matmul_peak_gflops_fp32=round(peak["fp32"], 1), matmul_peak_gflops_bf16=round(peak["bf16"], 1))
    flops = train_flops(model, args.batch)
    for dtype in args.dtypes:
        if args.only in (None, "train"):
            r = bench_train(model, dtype, args.warmup, args.iters, args.batch, args.compile)
            gflops = flops / r["train_step_s_median"] / 1e9
            r.update(train_gflops=gflops, train_fraction_of_peak=gflops / peak[dtype])
            result.update({f"{k}_{dtype}": round(v, 4) for k, v in r.items()})
            print(f"train {dtype}: {r['train_samples_per_s']:.1f} samples/s, {gflops:.0f} GFLOP/s = "
                  f"{100 * r['train_fraction_of_peak']:.0f}% of the {dtype} matmul peak", flush=True)
        if args.only in (None, "sample"):
            r = bench_sample(model, dtype, max(1, args.warmup // 2), max(2, args.iters // 2))
            result.update({f"{k}_{dtype}": round(v, 4) for k, v in r.items()})
            print(f"sample {dtype}: {r['sample_image_tokens_per_s']:.0f} image tokens/s", flush=True)
    for key in ("train_samples_per_s", "sample_image_tokens_per_s"):
        found = {d: result[f"{key}_{d}"] for d in args.dtypes if f"{key}_{d}" in result}
        if found:
            best = max(found, key=found.get)
            result[key], result[key.replace("_per_s", "_best_dtype")] = found[best], best
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
