"""Is a training run with the paper's BPE dropout repeatable, and does it resume exactly after `kill -9`?

    python benchmarks/reproducibility.py                      # configs/tiny.yaml, 300 transformer steps
    python benchmarks/reproducibility.py --steps 300 --kill-at 0.5 --out runs/reproducibility

Trains the tiny run's text tokenizer (bpe_dropout 0.1, the default), image tokenizer and token cache
once, then the transformer three times from that same folder, each through the real CLI in its own
process: A and B straight through, C killed with SIGKILL mid-run and re-run with the
same command (C is killed once its last.ckpt has reached `--kill-at` of the steps, so that it resumes
mid-run). Prints the largest absolute difference between the exported weights of A and B and of
A and C (both 0.0 when the run is deterministic and resumes exactly) as one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dalle_proto.cli", *args]


def checkpoint_step(path: Path) -> int:
    """The global step of a last.ckpt (written atomically, so never half-read), 0 before the first."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if path.is_file() else 0


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "transformer" / "model.safetensors")), load_file(str(b / "transformer" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of the steps after which run C is killed")
    p.add_argument("--out", default="runs/reproducibility")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base = out / "base"
    common = ["--config", args.config, f"out_dir={base}"]
    for stage in ("train-text-tokenizer", "train-image-tokenizer", "encode"):
        subprocess.run(cli(stage, *common), check=True, capture_output=True)
    dropout = json.loads((base / "text_tokenizer" / "tokenizer.json").read_text())["model"]["dropout"]
    runs = {}
    for name in "ABC":
        shutil.copytree(base, out / name)
        runs[name] = cli("train", "--config", args.config, f"out_dir={out / name}", f"training.steps={args.steps}",
                         f"training.checkpoint_every={max(1, args.steps // 30)}", "training.sample_every=0")
    seconds = {}
    for name in "AB":
        start = time.time()
        subprocess.run(runs[name], check=True, capture_output=True)
        seconds[name] = round(time.time() - start, 1)
    ckpt = out / "C" / "transformer_training" / "checkpoints" / "last.ckpt"
    victim = subprocess.Popen(runs["C"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while victim.poll() is None and checkpoint_step(ckpt) < args.kill_at * args.steps:
        time.sleep(0.2)
    killed = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = checkpoint_step(ckpt)
    subprocess.run(runs["C"], check=True, capture_output=True)
    print(json.dumps({"config": args.config, "steps": args.steps, "bpe_dropout": dropout,
                      "seconds_per_run": seconds, "killed_while_running": killed, "resumed_from_step": killed_at,
                      "max_abs_diff_same_command_twice": max_difference(out / "A", out / "B"),
                      "max_abs_diff_killed_and_resumed": max_difference(out / "A", out / "C")}))


if __name__ == "__main__":
    main()
