"""CUDA check: bf16 training, KV-cache exactness, sampling speed and DDP on the GPUs of this machine.

    python benchmarks/gpu_check.py                     # on a CUDA machine (not yet run on one)
    python benchmarks/gpu_check.py --steps 600 --batch-size 128
    python benchmarks/gpu_check.py --device cpu --tiny [--cpu-ddp 2]   # the same code paths on a CPU

Not yet run on a GPU: the defaults (300 steps of batch 64) are sized to stay well inside the
default --time-limit of 420 s, which the time guard enforces. On the project's idle 2-core CPU
machine the tiny mode takes 5.3 s (11.4 s with --cpu-ddp 2), tests/test_gpu_check.py runs it.

Sections (each reported under its own key of the JSON object; progress goes to stderr):
- train: builds a small shapes world itself (a BPE text tokenizer trained on the scenes' captions
  by `stages.train_text_tokenizer`, the shipped f4 VQGAN of checkpoints/shapes/image_tokenizer,
  or a random one with --tiny, encoding `--scenes` scenes with `token_cache.encode_to_cache` on the
  device), then trains the shapes transformer (configs/shapes.yaml, through
  `stages.train`, the stage `dalle-proto train` runs) with Lightning precision bf16-mixed on one device:
  steps/s and samples/s after a warm-up, first and last train loss (the loss must fall), the
  final validation loss and sample grid, peak GPU memory.
- kv_cache: for every attention mode (`attention_masks.ATTENTION_MODES`: the sparse pattern, its
  full-column variant, and each mask kind row/column/conv/full in every layer) the KV-cache
  logits of `sampling.generate_image_tokens_with_logits` against a full forward over the sampled
  tokens, in fp32 weights, bf16 weights (the pipeline's default) and fp32 weights under bf16
  autocast (the training sample grids), plus guided (cfg) sampling. Weights: the shipped shapes
  transformer loaded into each mode when present (realistic logits, |logit| up to ~26), else a
  random one. Tolerance: max |cache - full| <= 1e-4 + 1e-5 * max|logit| in fp32; in bf16
  <= 0.05 + 0.02 * max|logit| (0.25 = 2 bf16 ulps was measured on CPU at |logit| ~26, about 0.57
  allowed there; a wrong mask moves logits by whole units), both against the bf16 full forward
  and against the fp32 one; the guided check (scale 3) allows 5x, as cond's error counts 3x and
  uncond's 2x (max|logit| there: of the cond and uncond forwards).
- sampling: `generate_image_tokens` (top-k 10%, no guidance) at several batch sizes, bf16 and
  fp32 weights: image tokens/s, images/s, peak GPU memory. pipeline: `DallePipeline` on
  checkpoints/shapes (the trained run's folder with --tiny), its pipeline.json defaults, images/s.
- ddp: Lightning strategy ddp over all GPUs (configs/transformer_ddp_gpu.yaml over shapes.yaml,
  devices = torch.cuda.device_count()) for --ddp-steps steps in a subprocess; the replicas' final
  weights must be bitwise identical. Skipped (and said so) with fewer than 2 GPUs;
  `--cpu-ddp 2` runs it on CPU processes (gloo) instead.

A time guard (--time-limit) stops training early and skips later sections when time runs out.
Last stdout line: one JSON object; "passed" is true when every section that ran passed and none
was skipped for time. Exit status 0 when passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from dalle_proto import stages  # noqa: E402
from dalle_proto.attention_masks import ATTENTION_MODES  # noqa: E402
from dalle_proto.datasets import build_dataset  # noqa: E402
from dalle_proto.image_tokenizer import ImageTokenizer  # noqa: E402
from dalle_proto.pipeline import DallePipeline  # noqa: E402
from dalle_proto.run_config import RunConfig, load_run_config  # noqa: E402
from dalle_proto.sampling import generate_image_tokens, generate_image_tokens_with_logits  # noqa: E402
from dalle_proto.text_tokenizer import TextTokenizer  # noqa: E402
from dalle_proto.token_cache import encode_to_cache  # noqa: E402
from dalle_proto.transformer import DalleTransformer, TransformerConfig  # noqa: E402

SHIPPED = REPO / "checkpoints" / "shapes"
FP32_TOL, BF16_TOL = (1e-4, 1e-5), (0.05, 0.02)  # (absolute, times max |logit|)
GUIDED_SCALE = 3.0


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


class Deadline:
    def __init__(self, seconds: float):
        self.start, self.end = time.monotonic(), time.monotonic() + seconds
        self.hit = False  # a section was cut short or skipped for time

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self, reserve: float) -> bool:
        """True (and remembered in `hit`) when less than `reserve` seconds are left."""
        self.hit = self.hit or self.left() < reserve
        return self.left() < reserve


# ---- the shapes world and the training run ------------------------------------------------------
def run_config(args, out: Path) -> tuple[RunConfig, list[str]]:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    steps = args.steps
    overrides = [f"out_dir={out}", f"data.train_count={args.scenes}", f"data.eval_count={args.eval_scenes}",
                 f"training.steps={steps}", f"training.batch_size={args.batch_size}",
                 f"training.warmup_steps={max(1, steps // 10)}", f"training.precision={args.precision}",
                 f"training.accelerator={accelerator}", "training.devices=1", "training.strategy=auto",
                 f"training.num_workers={args.num_workers}", f"training.val_every={steps}",
                 "training.val_batches=2", f"training.checkpoint_every={steps}",
                 f"training.log_every={max(1, min(10, steps // 4))}", "training.sample_every=0"]
    if args.tiny:  # 32 px scenes, 8x8 token grid, tiny transformer: seconds on a CPU
        # depth 3: row, column, conv layers, so "sparse" and "sparse_full" differ
        overrides += ["image_tokenizer.ch_mult=[1,2,2]", "transformer.depth=3", "training.lr=3e-3",
                      "training.ema_decay=0.9"]
    yaml = REPO / "configs" / ("tiny.yaml" if args.tiny else "shapes.yaml")
    return load_run_config([yaml], overrides), [str(yaml.relative_to(REPO))] + overrides


def build_world(args, config: RunConfig, device: torch.device) -> dict:
    """out_dir/text_tokenizer, image_tokenizer, token_cache/{train,eval}: what `stages.train` reads."""
    t0 = time.perf_counter()
    stages.train_text_tokenizer(config)
    shipped = SHIPPED / "image_tokenizer"
    if not args.tiny and shipped.is_dir():
        image_tokenizer, source = ImageTokenizer.from_pretrained(shipped), str(shipped.relative_to(REPO))
    else:
        torch.manual_seed(0)
        image_tokenizer, source = ImageTokenizer(config.image_tokenizer), "random (untrained)"
    image_tokenizer.save_pretrained(config.out / "image_tokenizer")  # the run folder is a pipeline folder
    image_tokenizer.to(device)
    t1 = time.perf_counter()
    for split in ("train", "eval"):
        encode_to_cache(image_tokenizer, build_dataset(config.data, split), config.out / "token_cache" / split,
                        batch_size=256, progress=False, num_workers=args.num_workers)
    sync(device)
    t2 = time.perf_counter()
    n = config.data.train_count + config.data.eval_count
    return {"image_tokenizer": source, "scenes": n, "image_size": config.data.image_size,
            "text_vocab_size": TextTokenizer.from_pretrained(config.out / "text_tokenizer").vocab_size,
            "encode_images_per_s": round(n / (t2 - t1), 1), "build_s": round(t2 - t0, 2)}


def train_like_stage(config: RunConfig, callbacks: list[pl.Callback]) -> DalleTransformer:
    """`dalle-proto train`'s own stage, with the meter as an extra Lightning callback."""
    return stages.train(config, callbacks=callbacks)


class Meter(pl.Callback):
    """Per-step losses and synchronised step times; stops training at the deadline (time guard);
    writes each rank's result (and a hash of its final weights) to `folder/rank{r}.json`."""

    def __init__(self, deadline_unix: float, folder: Path | None = None):
        self.deadline_unix, self.folder = deadline_unix, folder
        self.losses: list[torch.Tensor] = []
        self.times: list[float] = []
        self.stopped_early = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float())
        sync(pl_module.device)  # the progress bar syncs every step anyway
        self.times.append(time.perf_counter())
        if time.time() > self.deadline_unix and trainer.global_step < trainer.max_steps:
            trainer.should_stop, self.stopped_early = True, True

    def result(self, batch_size: int, world_size: int) -> dict:
        losses = [float(x) for x in self.losses]
        n = len(losses)
        if n == 0:
            return {"steps_run": 0, "stopped_by_time_guard": self.stopped_early, "loss_fell": False}
        warm = min(10, max(1, n // 10))
        window = max(1, n // 10)
        steps_per_s = (n - 1 - warm) / (self.times[-1] - self.times[warm]) if n - 1 > warm else None
        first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
        return {"steps_run": n, "stopped_by_time_guard": self.stopped_early,
                "steps_per_s": round(steps_per_s, 3) if steps_per_s else None,
                "samples_per_s": round(steps_per_s * batch_size * world_size, 1) if steps_per_s else None,
                "timed_steps": max(0, n - 1 - warm), "loss_first": round(first, 4), "loss_last": round(last, 4),
                "final_train_loss": round(losses[-1], 4), "loss_window_steps": window,
                "loss_fell": bool(last < first and all(x == x and abs(x) != float("inf") for x in losses))}

    def on_train_end(self, trainer, pl_module) -> None:
        if self.folder is None:
            return
        digest = hashlib.sha256()
        for name, tensor in sorted({**{f"raw.{k}": v for k, v in pl_module.model.state_dict().items()},
                                    **({f"ema.{k}": v for k, v in pl_module.ema_model.state_dict().items()}
                                       if pl_module.ema_model is not None else {})}.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        result = {**self.result(trainer.datamodule.batch_size, trainer.world_size), "rank": trainer.global_rank,
                  "world_size": trainer.world_size, "weights_sha256": digest.hexdigest(),
                  "peak_gpu_memory_mib": peak_mib(pl_module.device)}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def train_section(args, config: RunConfig, device: torch.device, deadline: Deadline) -> tuple[dict, DalleTransformer]:
    meter = Meter(time.time() + max(5.0, deadline.left() * args.train_share))
    reset_peak(device)
    t0 = time.perf_counter()
    model = train_like_stage(config, [meter])
    wall = time.perf_counter() - t0
    r = meter.result(config.training.batch_size, 1)
    metrics = _last_metrics(config.out / "transformer_training" / "logs")
    grids = sorted((config.out / "transformer_training" / "samples").glob("step_*.png"))
    r.update(precision=config.training.precision, batch_size=config.training.batch_size,
             steps_requested=config.training.steps, transformer_params_millions=round(model.num_parameters() / 1e6, 3),
             attention=model.config.attention, val_loss=metrics.get("val/loss"),
             val_loss_ema=metrics.get("val/loss_ema"),
             sample_grid=grids[-1].name if grids else None, peak_gpu_memory_mib=peak_mib(device), wall_s=round(wall, 1))
    r["passed"] = bool(r["loss_fell"] and r["steps_run"] >= 2 and grids and (config.out / "transformer").is_dir())
    return r, model


def _last_metrics(logs: Path) -> dict:
    """The last value of each column of the newest metrics.csv (CSVLogger)."""
    import csv

    files = sorted(logs.glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    found: dict = {}
    if files:
        with open(files[-1], newline="") as f:
            for row in csv.DictReader(f):
                found.update({k: round(float(v), 4) for k, v in row.items() if v not in ("", None)})
    return found


# ---- KV cache against the full forward ----------------------------------------------------------
def kv_models(args, trained: DalleTransformer | None):
    """(source, state dict, config) whose weights every attention mode is checked with."""
    shipped = SHIPPED / "transformer"
    if not args.tiny and shipped.is_dir():
        model = DalleTransformer.from_pretrained(shipped)
        return str(shipped.relative_to(REPO)), model.state_dict(), model.config
    base = trained.config if trained is not None else TransformerConfig.from_size("tiny" if args.tiny else "peer")
    torch.manual_seed(0)
    model = DalleTransformer(base)
    with torch.no_grad():  # larger-than-init weights: logits that differ clearly between positions
        for p in model.parameters():
            p.mul_(3.0)
    return "random init x3", model.state_dict(), model.config


def kv_section(args, device: torch.device, trained: DalleTransformer | None, deadline: Deadline) -> dict:
    source, state, base = kv_models(args, trained)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, base.text_vocab_size, (4, base.text_len), generator=g).to(device)
    regimes = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16_autocast": (torch.float32, True)}
    results, all_ok = {}, True
    for mode in list(ATTENTION_MODES) + ["sparse_guided"]:
        if deadline.expired(5):
            results[mode] = {"skipped": "time guard"}
            all_ok = False
            continue
        attention, guided = mode.replace("_guided", ""), mode.endswith("_guided")
        model = DalleTransformer(dataclasses.replace(base, attention=attention)).eval().to(device)
        per = {}
        for name, (dtype, autocast) in regimes.items():
            model.float().load_state_dict(state)  # exact fp32 weights again after a bf16 round trip
            context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with context:
                r = _kv_compare(model.to(dtype), text, guided)
            with torch.no_grad():  # the reference: the same weights, the same tokens, fp32 compute
                ref, _ = _full_logits(model.float(), text, r.pop("tokens"), guided)
            r["max_abs_diff_vs_fp32_full"] = _max_diff(r.pop("logits"), ref)
            tol_abs, tol_rel = FP32_TOL if name == "fp32" else BF16_TOL
            # guided: uncond + s * (cond - uncond) adds s x cond's error and (s - 1) x uncond's
            tol = (tol_abs + tol_rel * r["max_abs_logit"]) * ((2 * GUIDED_SCALE - 1) if guided else 1)
            ok = r["max_abs_diff"] <= tol and (name == "fp32" or r["max_abs_diff_vs_fp32_full"] <= tol)
            per[name] = {**r, "tolerance": round(tol, 6), "passed": bool(ok)}
            all_ok &= ok
            log(f"kv {mode} {name}: max |cache - full| {r['max_abs_diff']:.3g} (tol {tol:.3g}), "
                f"vs fp32 {r['max_abs_diff_vs_fp32_full']:.3g} {'ok' if ok else 'FAIL'}")
        results[mode] = per
    return {"weights": source, "batch": text.shape[0], "guided_cfg_scale": GUIDED_SCALE,
            "tolerance_rule": "fp32: 1e-4 + 1e-5*max|logit|; bf16: 0.05 + 0.02*max|logit|; guided: x(2*scale - 1)",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "modes": results, "passed": bool(all_ok)}


def _full_logits(model: DalleTransformer, text: torch.Tensor, tokens: torch.Tensor,
                 guided: bool) -> tuple[torch.Tensor, float]:
    """Full-forward logits (B, N, Vi) (guided: uncond + scale * (cond - uncond)) and the largest
    |logit| of the forwards themselves, which the tolerance scales with."""
    _, cond = model(text, tokens.flatten(1))  # (B, N, Vi)
    if not guided:
        return cond.float(), float(cond.abs().max())
    _, uncond = model(model.null_text_ids(text.shape[0], device=text.device), tokens.flatten(1))
    magnitude = max(float(cond.abs().max()), float(uncond.abs().max()))
    return uncond.float() + GUIDED_SCALE * (cond.float() - uncond.float()), magnitude


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _kv_compare(model: DalleTransformer, text: torch.Tensor, guided: bool) -> dict:
    tokens, logits = generate_image_tokens_with_logits(model, text, seed=0, cfg_scale=GUIDED_SCALE if guided else 1.0)
    with torch.no_grad():
        full, magnitude = _full_logits(model, text, tokens, guided)
    return {"max_abs_diff": _max_diff(logits, full), "max_abs_logit": round(magnitude, 3),
            "argmax_agreement": round(float((logits.argmax(-1) == full.argmax(-1)).float().mean()), 4),
            "tokens": tokens, "logits": logits}


# ---- sampling speed -----------------------------------------------------------------------------
def sampling_section(args, device: torch.device, trained: DalleTransformer, deadline: Deadline) -> dict:
    shipped = SHIPPED / "transformer"
    use_shipped = not args.tiny and shipped.is_dir()
    model = DalleTransformer.from_pretrained(shipped) if use_shipped else trained
    c = model.config
    top_k = max(1, int(0.1 * c.image_vocab_size))
    rows, ok = [], True
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        m = model.to(device=device, dtype=dtype).eval()
        for batch in args.sample_batch_sizes:
            if deadline.expired(args.sample_reserve_s):
                rows.append({"dtype": dtype_name, "batch": batch, "skipped": "time guard"})
                ok = False
                continue
            text = torch.randint(0, c.text_vocab_size, (batch, c.text_len),
                                 generator=torch.Generator().manual_seed(batch)).to(device)
            reset_peak(device)
            times = []
            for i in range(1 + args.sample_repeats):  # the first run warms up kernels and caches
                sync(device)
                t = time.perf_counter()
                tokens = generate_image_tokens(m, text, top_k=top_k, seed=i)
                sync(device)
                if i:
                    times.append(time.perf_counter() - t)
            ok &= tokens.shape == (batch, c.image_grid, c.image_grid) and 0 <= int(tokens.min()) \
                and int(tokens.max()) < c.image_vocab_size
            s = statistics.median(times)
            rows.append({"dtype": dtype_name, "batch": batch, "image_tokens_per_s": round(batch * c.image_len / s, 1),
                         "images_per_s": round(batch / s, 3), "seconds": round(s, 4),
                         "peak_gpu_memory_mib": peak_mib(device)})
            log(f"sampling {dtype_name} batch {batch}: {batch * c.image_len / s:.0f} image tokens/s")
    return {"model": str(shipped.relative_to(REPO)) if use_shipped else "this run's transformer",
            "image_tokens_per_image": c.image_len, "top_k": top_k, "cfg_scale": 1.0,
            "repeats": args.sample_repeats, "runs": rows, "passed": bool(ok)}


def pipeline_section(args, config: RunConfig, device: torch.device, deadline: Deadline) -> dict:
    folder = SHIPPED if not args.tiny and (SHIPPED / "transformer").is_dir() else config.out
    pipe = DallePipeline.from_pretrained(folder, device=device)
    prompts = ["a red circle", "a green square to the left of a yellow triangle", "three purple crosses",
               "a large blue star in the top left"]
    rows, ok = [], True
    for n in args.pipeline_batch_sizes:
        if deadline.expired(args.sample_reserve_s):
            rows.append({"images": n, "skipped": "time guard"})
            ok = False
            continue
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        reset_peak(device)
        times = []
        for i in range(2):  # warm-up, then one timed call
            sync(device)
            t = time.perf_counter()
            images = pipe(chosen, num_images=1, seed=i)
            sync(device)
            times.append(time.perf_counter() - t)
        size = pipe.image_tokenizer.grid_size * pipe.image_tokenizer.config.downsample_factor
        ok &= len(images) == n and all(im.size == (size, size) and im.mode == "RGB" for im in images)
        rows.append({"images": n, "images_per_s": round(n / times[-1], 3), "seconds": round(times[-1], 4),
                     "peak_gpu_memory_mib": peak_mib(device)})
        log(f"pipeline {n} images: {n / times[-1]:.2f} images/s")
    source = str(folder.relative_to(REPO)) if folder == SHIPPED else "this run's folder"
    return {"folder": source, "config": dataclasses.asdict(pipe.config), "transformer_dtype": "bf16",
            "runs": rows, "passed": bool(ok)}


# ---- DDP ----------------------------------------------------------------------------------------
def ddp_section(args, config: RunConfig, device: torch.device, deadline: Deadline) -> dict:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < 2:
            return {"skipped": f"only {count} GPU present; DDP needs >= 2", "devices": count, "passed": True}
        accelerator, precision = "gpu", "bf16-mixed"
    elif args.cpu_ddp >= 2:
        count, accelerator, precision = args.cpu_ddp, "cpu", args.precision
    else:
        return {"skipped": "device cpu (pass --cpu-ddp 2 to run DDP over CPU processes)", "passed": True}
    if deadline.expired(30):
        return {"skipped": "time guard", "passed": False}
    yamls = ["tiny.yaml"] if args.tiny else ["shapes.yaml", "transformer_ddp_gpu.yaml"]
    folder = config.out / "ddp"
    for part in ("text_tokenizer", "image_tokenizer", "token_cache"):  # share the world, not the run
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / part).exists():
            os.symlink(config.out / part, folder / part)
    steps = args.ddp_steps
    overrides = [f"out_dir={folder}", f"training.accelerator={accelerator}", f"training.devices={count}",
                 "training.strategy=ddp", f"training.precision={precision}", f"training.steps={steps}",
                 f"training.warmup_steps={max(1, steps // 5)}", f"training.val_every={steps}", "training.val_batches=1",
                 f"training.checkpoint_every={steps}", "training.sample_every=0", "training.log_every=1",
                 f"training.num_workers={args.num_workers}"]
    if args.tiny:
        overrides += ["training.batch_size=2"]
    request = {"yamls": [str(REPO / "configs" / y) for y in yamls], "overrides": overrides,
               "deadline_unix": time.time() + deadline.left() - 15, "results": str(folder / "ranks")}
    (folder / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if accelerator == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    try:
        command = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", str(folder / "request.json")]
        proc = subprocess.run(command,
                              env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=max(20, deadline.left() - 5))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted((folder / "ranks").glob("rank*.json"))]
    identical = len({r["weights_sha256"] for r in ranks}) == 1
    r0 = next((r for r in ranks if r["rank"] == 0), {})
    return {"devices": count, "accelerator": accelerator, "precision": precision, "configs": yamls,
            "returncode": rc, "ranks_reporting": len(ranks), "replicas_identical": identical,
            **{k: r0.get(k) for k in ("steps_run", "steps_per_s", "samples_per_s", "loss_first", "loss_last",
                                       "stopped_by_time_guard")},
            "peak_gpu_memory_mib_per_rank": [r["peak_gpu_memory_mib"] for r in ranks], "wall_s": round(wall, 1),
            "passed": bool(rc == 0 and len(ranks) == count and identical)}


def ddp_worker(request_path: str) -> None:
    """Runs in every DDP rank (Lightning re-launches this command line for ranks >= 1)."""
    request = json.loads(Path(request_path).read_text())
    config = load_run_config(request["yamls"], request["overrides"])
    with contextlib.redirect_stdout(sys.stderr):
        train_like_stage(config, [Meter(request["deadline_unix"], Path(request["results"]))])


# ---- main ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and data, a handful of steps (CPU smoke run)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300; --tiny 12)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 64; --tiny 4)")
    p.add_argument("--scenes", type=int, default=None, help="train scenes to encode (default 4000; --tiny 64)")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision of the training run")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default 4; --tiny 0)")
    p.add_argument("--ddp-steps", type=int, default=None, help="DDP training steps (default 30; --tiny 3)")
    p.add_argument("--cpu-ddp", type=int, default=0, help="on --device cpu: run the DDP section over N processes")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for everything (default 420; --tiny 120)")
    p.add_argument("--out", default=None, help="keep the run here (default: a temporary folder, deleted)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(steps=(12, 300), batch_size=(4, 64), scenes=(64, 4000), num_workers=(0, 4), ddp_steps=(3, 30),
                    time_limit=(120.0, 420.0))
    for key, (small, large) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else large)
    # validation gives every DDP rank whole batches of 32 (configs/transformer_ddp_gpu.yaml); a rank
    # with none makes Lightning stop ("DataLoader within local rank has zero length")
    gpus = torch.cuda.device_count() if args.device == "cuda" and torch.cuda.is_available() else 1
    args.eval_scenes = 16 if tiny else max(256, 32 * gpus + 32)
    args.sample_batch_sizes = [1, 4] if tiny else [1, 8, 64, 256]
    args.pipeline_batch_sizes = [2] if tiny else [1, 16, 64]
    args.sample_repeats = 1 if tiny else 2
    args.sample_reserve_s = 3 if tiny else 15
    args.train_share = 0.5  # of the time left when training starts
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker)
        return 0
    deadline = Deadline(args.time_limit)
    device = torch.device(args.device)
    result: dict = {"script": "benchmarks/gpu_check.py", "mode": f"{args.device}{'-tiny' if args.tiny else ''}",
                    "torch": torch.__version__, "lightning": pl.__version__, "cuda": torch.version.cuda,
                    "time_limit_s": args.time_limit}
    if device.type == "cuda" and not torch.cuda.is_available():
        result.update(error="CUDA is not available (torch.cuda.is_available() is False)", passed=False)
        print(json.dumps(result))
        return 2
    result.update(device_name=device_name(device),
                  device_count=torch.cuda.device_count() if device.type == "cuda" else os.cpu_count(),
                  bf16_supported=torch.cuda.is_bf16_supported() if device.type == "cuda" else None)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.out and out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} exists and is not empty; pass a new folder (runs would resume)")
    config, overrides = run_config(args, out)
    result["train_config"] = overrides
    trained, passed = None, True

    def section(name: str, fn, *fargs):
        nonlocal passed
        log(f"{name}: start ({deadline.left():.0f} s left)")
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stages and Lightning print; stdout is the JSON's
                value = fn(*fargs)
        except Exception as e:  # report and go on: one broken section must not hide the others
            traceback.print_exc(file=sys.stderr)
            value = {"passed": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        r = value[0] if isinstance(value, tuple) else value
        passed &= bool(r.get("passed", True))
        result[name] = r
        log(f"{name}: {'passed' if r.get('passed', True) else 'FAILED'} ({deadline.left():.0f} s left)")
        return value

    try:
        world = section("world", lambda: build_world(args, config, device))
        if "error" not in world:
            value = section("train", train_section, args, config, device, deadline)
            trained = value[1] if isinstance(value, tuple) else None
        if trained is None:
            passed = False
        result.setdefault("train", {"skipped": "no shapes world", "passed": False})
        section("kv_cache", kv_section, args, device, trained, deadline)
        if trained is not None:
            section("sampling", sampling_section, args, device, trained, deadline)
            section("pipeline", pipeline_section, args, config, device, deadline)
        section("ddp", ddp_section, args, config, device, deadline)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - deadline.start, 1)
    result["time_guard_hit"] = (deadline.left() < 0 or deadline.hit
                                or bool(result.get("train", {}).get("stopped_by_time_guard")))
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["passed"] = bool(passed)
    print(json.dumps(result))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
