"""Sampling speed and memory: dalle_proto's KV-cache sampler vs minDALL-E's `past`-based sampler, same weights.

    python3 benchmarks/mindalle_sampling.py                 # 2 layers, batch 4, 2 threads
    python3 benchmarks/mindalle_sampling.py --layers 1 --iters 1

Model: minDALL-E 1.3B's layer shape (dim 1536, 24 heads x 64, 64 text + 256 image tokens over
16384 BPE ids and 16384 codes) with only `--layers` of its 42 blocks, random weights (the same
seed in every run). Three samplers, each in a fresh process of its own so that its memory is its own:
- mindalle: `tests/mindalle_reference.py`, a re-implementation of minDALL-E's Transformer1d and its
  `dalle/utils/sampling.py` loop in fp32: every step concatenates the growing list of per-step K/V
  (`past`) again and samples from top-k logits with multinomial over the whole vocabulary.
- dalle_proto_fp32: the converted DalleTransformer (`mindalle.convert_stage2`, as `dalle-proto
  convert mindalle` writes it) through `sampling.generate_image_tokens`, fp32 weights: preallocated
  K/V written in place, top-k drawn among the k best. The same computation as mindalle's.
- dalle_proto_bf16: the same with bf16 weights, as `DallePipeline.from_pretrained` loads them by
  default (fp32 KV cache and sampling).
All sample 256 image tokens per image at top-k 256, temperature 1, no guidance. Each process first
samples greedily (top-k 1, untimed warm-up); the parent compares the greedy codes with mindalle's
("greedy_codes_equal": the fp32 samplers compute the same thing). Then `--iters` timed runs; the
median counts. Memory: the process's resident set before sampling (the weights) and its peak over
all its sampling runs, warm-up included (the high-water mark is reset first, /proc/self/clear_refs),
in MiB.
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

import mindalle_reference as ref  # noqa: E402
from dalle_proto.mindalle import convert_stage2, transformer_config  # noqa: E402
from dalle_proto.sampling import generate_image_tokens  # noqa: E402
from dalle_proto.transformer import DalleTransformer  # noqa: E402

DIM, HEADS, TEXT_LEN, IMAGE_LEN, VOCAB = 1536, 24, 64, 256, 16384
SAMPLERS = ("mindalle", "dalle_proto_fp32", "dalle_proto_bf16")


def build(layers: int, seed: int = 0) -> tuple[ref.Transformer1d, DalleTransformer]:
    torch.manual_seed(seed)
    theirs = ref.Transformer1d(VOCAB, VOCAB, DIM, layers, HEADS, IMAGE_LEN, TEXT_LEN).eval()
    with torch.no_grad():  # GPT-like scales; heads wide enough that greedy choices are not near-ties
        for name, p in theirs.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                continue
            p.normal_(0.0, 0.05 if name.startswith("head") else 0.02)
    cfg = {"stage2": {"vocab_size_txt": VOCAB, "vocab_size_img": VOCAB, "hparams": {
        "embed_dim": DIM, "n_layers": layers, "n_heads": HEADS, "ctx_len_img": IMAGE_LEN, "ctx_len_txt": TEXT_LEN}}}
    with torch.device("meta"):
        ours = DalleTransformer(transformer_config(cfg, pad_id=VOCAB - 1))
    ours.load_state_dict(convert_stage2(theirs.state_dict(), cfg), strict=True, assign=True)  # shares storage
    return theirs, ours.eval()


def memory_mib() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    theirs, ours = build(args.layers)
    if args.worker == "mindalle":
        del ours
    else:  # only our copy stays: fused q/k/v, the rest shared with theirs until now
        del theirs
        if args.worker == "dalle_proto_bf16":
            ours = ours.to(torch.bfloat16)
    gc.collect()
    text = torch.randint(0, VOCAB - 1, (args.batch, TEXT_LEN), generator=torch.Generator().manual_seed(1))
    text[:, 20:] = VOCAB - 1  # a caption of 20 ids, then [PAD]

    def sample(top_k: int, seed: int) -> torch.Tensor:  # (B, 256)
        if args.worker == "mindalle":
            torch.manual_seed(seed)
            return ref.sampling(theirs, text, top_k=top_k, max_seq_len=IMAGE_LEN)
        return generate_image_tokens(ours, text, top_k=top_k, temperature=1.0, seed=seed).flatten(1)

    with torch.inference_mode():
        before = memory_mib()["VmRSS"]
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident set
        start = time.perf_counter()
        greedy = sample(1, 0)
        warmup = time.perf_counter() - start
        times = []
        for i in range(args.iters):
            start = time.perf_counter()
            sample(args.top_k, i)
            times.append(time.perf_counter() - start)
            print(f"{args.worker} run {i}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
        peak = memory_mib()["VmHWM"]
    return {"greedy": greedy.tolist(), "warmup_s": round(warmup, 3), "times_s": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3), "rss_before_mib": round(before, 1),
            "peak_mib": round(peak, 1), "sampling_extra_mib": round(peak - before, 1),
            "params_millions": round(sum(p.numel() for p in (theirs if args.worker == "mindalle" else ours)
                                         .parameters()) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2, help="timed runs per sampler (after one greedy warm-up)")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--worker", choices=SAMPLERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for name in args.samplers:  # one process each: memory and allocator state are the sampler's own
        argv = [sys.executable, __file__, "--worker", name, "--layers", str(args.layers), "--batch", str(args.batch),
                "--iters", str(args.iters), "--top-k", str(args.top_k), "--threads", str(args.threads)]
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = args.batch * IMAGE_LEN
    out = {"dim": DIM, "heads": HEADS, "layers": args.layers, "batch": args.batch, "text_len": TEXT_LEN,
           "image_len": IMAGE_LEN, "vocab": VOCAB, "top_k": args.top_k, "iters": args.iters,
           "threads": args.threads, "torch": torch.__version__}
    greedy = {k: torch.tensor(v.pop("greedy")) for k, v in results.items()}
    for name, r in results.items():
        out[name] = r | {"image_tokens_per_s": round(tokens / r["median_s"], 1),
                         "s_per_image": round(r["median_s"] / args.batch, 3)}
        if name != "mindalle" and "mindalle" in results:
            same = greedy[name] == greedy["mindalle"]  # (B, 256)
            out[name] |= {"greedy_codes_equal": bool(same.all()),
                          "greedy_first_differing_token": None if bool(same.all()) else
                          int((~same).any(0).nonzero()[0]),
                          "speedup_vs_mindalle": round(results["mindalle"]["median_s"] / r["median_s"], 3),
                          "peak_vs_mindalle": round(r["peak_mib"] / results["mindalle"]["peak_mib"], 3),
                          "sampling_extra_vs_mindalle": round(r["sampling_extra_mib"] /
                                                              max(results["mindalle"]["sampling_extra_mib"], 1e-9), 3)}
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
