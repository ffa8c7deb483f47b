"""Sampling speed: dalle_proto's KV-cache sampler vs minDALL-E's `past`-based sampler, same weights.

    python3 benchmarks/mindalle_sampling.py                 # 2 layers, batch 4, fp32, 2 threads
    python3 benchmarks/mindalle_sampling.py --layers 1 --iters 1

Model: minDALL-E 1.3B's layer shape (dim 1536, 24 heads x 64, 64 text + 256 image tokens over
16384 BPE ids and 16384 codes) with only `--layers` of its 42 blocks, random weights. The same
weights run twice:
- mindalle: `tests/mindalle_reference.py`, a re-implementation of minDALL-E's Transformer1d and its
  `dalle/utils/sampling.py` loop: every step concatenates the growing list of per-step K/V
  (`past`) again, samples from top-k logits with multinomial over the whole vocabulary.
- dalle_proto: the converted DalleTransformer (`mindalle.convert_stage2`, as `dalle-proto convert
  mindalle` writes it) through `sampling.generate_image_tokens`: preallocated K/V written in place,
  top-k drawn among the k best.
Both sample all 256 image tokens at top-k 256, temperature 1, fp32, no guidance. The warm-up run
of each is greedy (top-k 1) and the two code grids are compared ("greedy_codes_equal"), so the
timing is of two samplers that compute the same thing. Median of `--iters` timed runs each.
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


def timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2, help="timed runs per sampler (after one greedy warm-up)")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    theirs, ours = build(args.layers)
    text = torch.randint(0, VOCAB - 1, (args.batch, TEXT_LEN), generator=torch.Generator().manual_seed(1))
    text[:, 20:] = VOCAB - 1  # a caption of 20 ids, then [PAD]

    def mindalle(top_k: int) -> torch.Tensor:
        return ref.sampling(theirs, text, top_k=top_k, max_seq_len=IMAGE_LEN)  # (B, 256)

    def dalle_proto(top_k: int, seed: int = 0) -> torch.Tensor:
        return generate_image_tokens(ours, text, top_k=top_k, temperature=1.0, seed=seed).flatten(1)  # (B, 256)

    with torch.inference_mode():
        greedy_theirs, warm_theirs = timed(lambda: mindalle(1))
        greedy_ours, warm_ours = timed(lambda: dalle_proto(1))
        times: dict[str, list[float]] = {"mindalle": [], "dalle_proto": []}
        for i in range(args.iters):
            torch.manual_seed(i)
            times["mindalle"].append(timed(lambda: mindalle(args.top_k))[1])
            times["dalle_proto"].append(timed(lambda: dalle_proto(args.top_k, seed=i))[1])
            print(f"run {i}: mindalle {times['mindalle'][-1]:.2f} s, dalle_proto {times['dalle_proto'][-1]:.2f} s",
                  flush=True)
    same = greedy_theirs == greedy_ours  # (B, 256)
    first_diff = int((~same).any(0).nonzero()[0]) if not bool(same.all()) else None
    median = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * IMAGE_LEN
    result = {
        "dim": DIM, "heads": HEADS, "layers": args.layers, "batch": args.batch, "text_len": TEXT_LEN,
        "image_len": IMAGE_LEN, "vocab": VOCAB, "dtype": "fp32", "top_k": args.top_k, "iters": args.iters,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params_millions": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "greedy_codes_equal": bool(same.all()), "greedy_first_differing_token": first_diff,
        "greedy_warmup_s": {"mindalle": round(warm_theirs, 3), "dalle_proto": round(warm_ours, 3)},
        "mindalle_s_median": round(median["mindalle"], 3), "dalle_proto_s_median": round(median["dalle_proto"], 3),
        "mindalle_image_tokens_per_s": round(tokens / median["mindalle"], 1),
        "dalle_proto_image_tokens_per_s": round(tokens / median["dalle_proto"], 1),
        "speedup": round(median["mindalle"] / median["dalle_proto"], 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
