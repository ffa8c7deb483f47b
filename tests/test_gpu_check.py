"""benchmarks/gpu_check.py: its CPU tiny mode runs every section and reports one JSON line; its KV-cache
check catches a wrong cache mask; the CUDA check itself runs only where a GPU is present."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_proto.attention_masks import ATTENTION_MODES, additive_mask, cache_slot_mask
from dalle_proto.transformer import DalleTransformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
KEYS = {"script", "mode", "device_name", "device_count", "torch", "lightning", "cuda", "world", "train",
        "kv_cache", "sampling", "pipeline", "ddp", "wall_s", "time_guard_hit", "passed"}
REGIMES = ("fp32", "bf16", "bf16_autocast")


def run_script(*args: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert KEYS <= report.keys(), sorted(KEYS - report.keys())
    return report


def check_report(report: dict) -> None:
    assert report["passed"] is True
    train = report["train"]
    assert train["passed"] and train["loss_last"] < train["loss_first"] and train["steps_per_s"] > 0
    assert train["sample_grid"] and train["val_loss"] is not None
    modes = report["kv_cache"]["modes"]
    assert set(modes) == set(ATTENTION_MODES) | {"sparse_guided"}
    for mode, regimes in modes.items():
        assert set(regimes) == set(REGIMES), mode
        for name, r in regimes.items():
            assert r["passed"] and r["max_abs_diff"] <= r["tolerance"], (mode, name, r)
        assert regimes["fp32"]["max_abs_diff"] < 1e-3, mode  # far below a mask error's whole units
    for r in report["sampling"]["runs"] + report["pipeline"]["runs"]:
        assert "skipped" not in r and r["images_per_s"] > 0, r


def test_cpu_tiny_mode_runs_every_section_and_passes():
    # --cpu-ddp 2: the DDP section's worker (re-launched by Lightning for rank 1) over two gloo
    # processes, so that path cannot rot either. About 12 s on an idle 2-core machine; the time
    # limit is generous so that a loaded machine tests the code paths, not its speed.
    report = run_script("--device", "cpu", "--tiny", "--cpu-ddp", "2", "--time-limit", "600", timeout=900)
    check_report(report)
    assert report["mode"] == "cpu-tiny" and report["time_guard_hit"] is False
    assert report["train"]["precision"] == "bf16-mixed" and report["train"]["peak_gpu_memory_mib"] is None
    ddp = report["ddp"]
    assert ddp["passed"] and ddp["devices"] == ddp["ranks_reporting"] == 2 and ddp["replicas_identical"]
    assert ddp["steps_run"] == 3


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kv_check_catches_a_wrong_cache_mask():
    gpu_check = load_script()
    torch.manual_seed(0)
    model = DalleTransformer(TransformerConfig(text_vocab_size=50, text_len=5, image_vocab_size=40, image_grid=4,
                                               dim=32, depth=2, heads=2, head_dim=16, attention="row")).eval()
    text = torch.randint(0, 50, (2, 5))
    assert gpu_check._kv_compare(model, text, guided=False)["max_abs_diff"] < 1e-5
    # a cache mask with a bug the full forward does not have: image queries cannot see the text
    mask = cache_slot_mask("row", 5, 4)
    mask[5:, :5] = False
    wrong = additive_mask(mask)
    model._mask_biases[("row", torch.float32, torch.device("cpu"))] = wrong
    r = gpu_check._kv_compare(model, text, guided=False)
    tol = gpu_check.FP32_TOL[0] + gpu_check.FP32_TOL[1] * r["max_abs_logit"]
    assert r["max_abs_diff"] > 100 * tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_check_passes():
    report = run_script("--device", "cuda", timeout=900)
    check_report(report)
    assert report["mode"] == "cuda" and report["train"]["peak_gpu_memory_mib"] > 0
    if report["device_count"] >= 2:
        assert report["ddp"]["passed"] and report["ddp"]["replicas_identical"]
    else:
        assert "only 1 GPU" in report["ddp"]["skipped"]
