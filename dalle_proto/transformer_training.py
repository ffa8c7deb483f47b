"""Training the DALL·E transformer on an image-token cache with Lightning (CPU, one GPU, DDP, FSDP).

    model = train_transformer(TransformerConfig.from_size("tiny"), TransformerTrainConfig(steps=1000),
                              text_tokenizer, TokenCache("runs/x/token_cache"), None, "runs/x",
                              image_tokenizer=ImageTokenizer.from_pretrained("runs/x/image_tokenizer"))

The run folder `out_dir` gets:
    checkpoints/last.ckpt      every `checkpoint_every` steps and at the end, written atomically;
                               calling train_transformer again with the same out_dir resumes from it
                               exactly (same parameters as an uninterrupted run; see transformer_data.py
                               for the one exception, BPE dropout)
    samples/step_XXXXXX.png    sample grids of the fixed captions, every `sample_every` steps
    logs/version_N/metrics.csv losses, lr, grad norm, validation losses (one version per (re)start)
    transformer/               the final weights (EMA when enabled), DalleTransformer.from_pretrained

The optimiser is the paper's: AdamW (betas 0.9/0.96, eps 1e-8, weight decay 4.5e-2 on the weight
matrices of Linear layers only: not on biases, LayerNorm gains, embeddings or position tables),
gradient-norm clipping at 4, linear warm-up to the peak lr, then constant, cosine, or the paper's
"halve on plateau" of the validation loss. An exponential moving average of the parameters is
kept inside the LightningModule (`ema_model`), so it is saved in, and restored from, checkpoints.

Under FSDP each `TransformerLoss` (transformer_loss.py; raw and EMA) and each transformer block is its own FSDP unit:
the raw and EMA copies are then sharded identically, so the EMA update is a purely local lerp of
matching shards, and the loss goes through the unit's forward, which gathers its parameters.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from dalle_proto.checkpointing import AtomicCheckpointIO, last_checkpoint, load_training_checkpoint
from dalle_proto.cpu_memory import retain_freed_memory
from dalle_proto.pretrained import load_state_dict_strict
from dalle_proto.training_callbacks import SampleGrid, StepCheckpoint
from dalle_proto.transformer import Block, DalleTransformer, TransformerConfig
from dalle_proto.transformer_data import CONTRAST_NEGATIVES, TokenCacheBatches, check_compatible, split_indices, step_seed
from dalle_proto.transformer_loss import TransformerLoss

LR_SCHEDULES = ("constant", "cosine", "plateau")
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class TransformerTrainConfig:
    steps: int = 10000  # optimizer updates
    batch_size: int = 16  # per device; the global batch is batch_size x devices x num_nodes
    lr: float = 4.5e-4  # peak, reached at the end of the warm-up
    betas: list[float] = field(default_factory=lambda: [0.9, 0.96])
    eps: float = 1e-8
    weight_decay: float = 4.5e-2  # Linear weight matrices only
    grad_clip: float = 4.0  # max global gradient norm; 0 disables
    warmup_steps: int = 5000
    lr_schedule: str = "cosine"  # after warm-up: "constant" | "cosine" | "plateau"
    min_lr_ratio: float = 0.1  # cosine: final lr = min_lr_ratio x lr
    plateau_patience: int = 2  # plateau: validations without improvement before the lr halves
    plateau_threshold: float = 1e-3  # plateau: relative improvement that counts
    plateau_max_halvings: int = 5  # the paper halves 5 times
    ema_decay: float = 0.999  # 0 disables the EMA
    caption_dropout: float = 0.1  # share of captions replaced by the null text (classifier-free guidance)
    # caption contrast (TransformerLoss): softplus(-beta * (log p(x | caption) - log p(x | perturbed)))
    contrast_weight: float = 0.0  # 0 disables; needs captions of the shapes grammar
    contrast_beta: float = 0.1  # per nat of the summed image log-likelihood ratio
    contrast_negatives: str = "any"  # "any": one attribute changed | "binding": exchanges, copies, number | "exchange"
    contrast_reference: bool = False  # CCA's form: both likelihoods against the frozen init_from weights
    converse_relations: float = 0.0  # shapes pairs: P(restate "A right of / below B" as "B left of / above A")
    converse_steps: int | None = None  # restate only in the first N steps (None: the whole run)
    init_from: str | None = None  # a transformer folder, or a pipeline folder with transformer/: start from its weights
    precision: str = "bf16-mixed"  # "32-true" for exactness tests; any Lightning precision string
    val_every: int = 500  # steps between validations; 0 disables validation
    val_batches: int = 8  # per validation, per device
    val_fraction: float = 0.02  # held out of the training cache when no val_cache is given
    sample_every: int = 1000  # steps between sample grids; 0 disables them (the final grid stays)
    sample_captions: list[str] = field(default_factory=list)  # empty: the first validation captions
    sample_cfg_scale: float = 3.0
    sample_temperature: float = 1.0
    sample_top_k: int | None = None
    log_every: int = 50
    checkpoint_every: int = 1000
    seed: int = 0
    num_workers: int = 0  # data-loader workers per device (tokenisation runs there)
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"  # "auto" | "ddp" | "fsdp"
    num_nodes: int = 1

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two values in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (0 <= self.caption_dropout < 1, "caption_dropout must be in [0, 1)"),
            (self.contrast_weight >= 0 and self.contrast_beta > 0, "contrast_weight must be >= 0, contrast_beta > 0"),
            (self.contrast_negatives in CONTRAST_NEGATIVES, f"contrast_negatives must be one of {CONTRAST_NEGATIVES}"),
            (not self.contrast_reference or (self.init_from is not None and self.contrast_weight > 0),
             "contrast_reference needs contrast_weight > 0 and init_from (the reference is the starting model)"),
            (0 <= self.converse_relations <= 1, "converse_relations must be in [0, 1]"),
            (self.converse_steps is None or (self.converse_steps >= 1 and self.converse_relations > 0),
             "converse_steps must be >= 1 and needs converse_relations > 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (min(self.val_every, self.val_batches, self.sample_every, self.grad_clip, self.num_workers) >= 0,
             "val_every, val_batches, sample_every, grad_clip and num_workers must be >= 0"),
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.lr_schedule != "plateau" or self.validates, "lr_schedule 'plateau' needs validation "
                                                              "(val_every > 0 and val_batches > 0)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TransformerTrainConfig: {message}; got {self}")

    @property
    def validates(self) -> bool:
        return self.val_every > 0 and self.val_batches > 0


def lr_at(config: TransformerTrainConfig, step: int, plateau_halvings: int = 0) -> float:
    """Learning rate of optimizer update `step` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
        floor = config.min_lr_ratio
        return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if config.lr_schedule == "plateau":
        return config.lr * 0.5 ** plateau_halvings
    return config.lr


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on Linear weight matrices, none on everything else (biases,
    LayerNorm, embedding tables, position tables): decaying those only shrinks the learned
    per-token / per-position vectors and the normalisation gains towards zero."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay_ids -= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # tied heads
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]


class TransformerLightningModule(pl.LightningModule):
    """Holds the trained weights (`model`) and their EMA (`ema_model`), each a TransformerLoss around
    a plain DalleTransformer; checkpoint keys are `model.transformer.*` and `ema_model.transformer.*`."""

    def __init__(self, transformer: DalleTransformer, config: TransformerTrainConfig):
        super().__init__()
        self.config = config
        reference = copy.deepcopy(transformer) if config.contrast_reference else None  # the init_from weights
        contrast = dict(contrast_weight=config.contrast_weight, contrast_beta=config.contrast_beta, reference=reference)
        self.model = TransformerLoss(transformer, **contrast)
        self.ema_model = (TransformerLoss(copy.deepcopy(transformer).requires_grad_(False), **contrast)
                          if config.ema_decay > 0 else None)
        self.plateau = {"best": math.inf, "bad_validations": 0, "halvings": 0}
        self._val_sums: dict[str, torch.Tensor] = {}

    @property
    def sampling_unit(self) -> torch.nn.Module:
        """The weights to sample with and to export: the EMA when enabled (FSDP-wrapped under FSDP)."""
        return self.ema_model if self.ema_model is not None else self.model

    @property
    def sampling_model(self) -> DalleTransformer:
        return self.sampling_unit.transformer

    # ---- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.config
        # fused: one kernel per step instead of a dozen foreach passes (about 3% of a CPU step)
        return torch.optim.AdamW(optimizer_param_groups(self.model, c.weight_decay), lr=lr_at(c, 0),
                                 betas=tuple(c.betas), eps=c.eps, fused=self.device.type in ("cpu", "cuda"))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lr = lr_at(self.config, self.global_step, self.plateau["halvings"])
        for group in self.optimizers(use_pl_optimizer=False).param_groups:
            group["lr"] = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # dropout draws from torch's global RNG: seed it from (seed, step, rank) so a resumed run
        # draws what the uninterrupted run drew, without saving RNG states
        torch.manual_seed(step_seed(self.config.seed, self.global_step, self.global_rank))
        loss, parts = self.model(**batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name in ("text_loss", "image_loss", "contrast_acc"))
        self.log("lr", self.optimizers(use_pl_optimizer=False).param_groups[0]["lr"], prog_bar=True)
        return loss

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        # our own clipping: FSDP needs its root module's clip_grad_norm_ (Lightning refuses norm
        # clipping under FSDP), and the pre-clip norm is worth logging anyway
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel):
            norm = root.clip_grad_norm_(max_norm)  # must be called on the root, on every rank
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.log("train/grad_norm", norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._update_ema()  # here, not in on_train_batch_end: a checkpoint saved there must include it

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_model is None:
            return
        # EMA warm-up: early weights are near-random, so average over at most ~update updates
        update = self.global_step  # 0-based index of the update just applied (incremented after this hook)
        decay = min(self.config.ema_decay, (1 + update) / (10 + update))
        ema = list(self.ema_model.parameters())
        raw = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema, raw, 1.0 - decay)

    # ---- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        models = {"": self.model, "_ema": self.ema_model}
        for suffix, model in models.items():
            if model is None:
                continue
            loss, parts = model(**batch)
            for name, value in {"loss": loss, **parts}.items():
                key = f"val/{name}{suffix}"
                self._val_sums[key] = self._val_sums.get(key, 0.0) + value.detach().float()
        self._val_sums["count"] = self._val_sums.get("count", 0.0) + torch.ones((), device=self.device)

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        # mean over every rank's batches; every rank then takes the same plateau decision
        sums = {k: self.trainer.strategy.reduce(torch.as_tensor(v, device=self.device), reduce_op="sum")
                for k, v in self._val_sums.items()}
        count = sums.pop("count")
        means = {k: (v / count).item() for k, v in sums.items()}
        for key, value in means.items():
            self.log(key, value, prog_bar=key == "val/loss", sync_dist=False)
        if not self.trainer.sanity_checking and self.config.lr_schedule == "plateau":
            self._plateau_update(means["val/loss"])

    def _plateau_update(self, val_loss: float) -> None:
        p, c = self.plateau, self.config
        if val_loss < p["best"] * (1 - c.plateau_threshold):
            p["best"], p["bad_validations"] = val_loss, 0
            return
        p["bad_validations"] += 1
        if p["bad_validations"] >= c.plateau_patience and p["halvings"] < c.plateau_max_halvings:
            p["halvings"] += 1
            p["bad_validations"] = 0
            rank_zero_info(f"step {self.global_step}: validation loss plateaued at {p['best']:.4f}; "
                           f"lr halved ({p['halvings']}/{c.plateau_max_halvings})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["plateau"] = dict(self.plateau)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.plateau = dict(checkpoint.get("plateau", self.plateau))


CODE_PIXEL_GRIDS = 2048  # training pictures whose decoded cells give each code its look (code_pixels)


# ---- the entry point -----------------------------------------------------------------------------
def train_transformer(transformer_config: TransformerConfig, train_config: TransformerTrainConfig,
                      text_tokenizer: Any, train_cache: Any, val_cache: Any | None, out_dir: str | os.PathLike,
                      image_tokenizer: torch.nn.Module | None = None,
                      callbacks: list[pl.Callback] | None = None) -> DalleTransformer:
    """Train (or resume, when `out_dir/checkpoints/last.ckpt` exists) and export `out_dir/transformer`.

    train_cache / val_cache: TokenCache-like data sets of (image_ids (h, w), caption). Without a
    val_cache, `val_fraction` of train_cache is held out. image_tokenizer: decodes the sample grids
    (none are made without it). callbacks: extra Lightning callbacks. Returns the exported weights
    (EMA when enabled) as a DalleTransformer on the CPU, in eval mode, on every rank.
    """
    c, out_dir = train_config, Path(out_dir)
    check_compatible(transformer_config, text_tokenizer, train_cache, val_cache, image_tokenizer)
    if val_cache is None and c.validates and c.val_fraction > 0:
        train_indices, val_indices = split_indices(len(train_cache), c.val_fraction, c.seed)
        val_cache = train_cache
    else:
        train_indices = range(len(train_cache))
        val_indices = range(len(val_cache)) if val_cache is not None else []
    validates = c.validates and len(val_indices) > 0
    data = TokenCacheBatches(text_tokenizer, train_cache, train_indices, val_cache, val_indices,
                             batch_size=c.batch_size, steps=c.steps, seed=c.seed,
                             caption_dropout=c.caption_dropout, val_batches=c.val_batches if validates else 0,
                             num_workers=c.num_workers, contrast=c.contrast_weight > 0,
                             contrast_negatives=c.contrast_negatives, converse_relations=c.converse_relations,
                             converse_steps=c.converse_steps)

    retain_freed_memory()  # no page faults on the per-step activation buffers (cpu_memory.py)
    torch.manual_seed(c.seed)  # identical initial weights on every rank and every (re)start
    transformer = DalleTransformer(transformer_config)
    if transformer_config.code_pixels:  # check_compatible has matched it to the image tokenizer
        grids = torch.stack([train_cache[i][0] for i in train_indices[:CODE_PIXEL_GRIDS]])  # (M, h, w)
        transformer.set_code_pixels(image_tokenizer.code_pixels(grids))
    if c.init_from is not None:  # on a resume, last.ckpt then replaces these weights
        _init_from(transformer, c.init_from)
    module = TransformerLightningModule(transformer, c)
    checkpoint_dir = out_dir / "checkpoints"
    all_callbacks: list[pl.Callback] = [StepCheckpoint(
        checkpoint_dir, c.checkpoint_every, validation_due=lambda step: validates and step % c.val_every == 0)]
    if image_tokenizer is not None:
        captions = c.sample_captions or [val_cache[i][1] for i in list(val_indices)[:8]]
        all_callbacks.append(SampleGrid(out_dir, captions, c.sample_every, text_tokenizer, image_tokenizer,
                                        cfg_scale=c.sample_cfg_scale, temperature=c.sample_temperature,
                                        top_k=c.sample_top_k, seed=c.seed))
    trainer = pl.Trainer(
        accelerator=c.accelerator, devices=c.devices, num_nodes=c.num_nodes, strategy=_strategy(c),
        precision=c.precision, max_steps=c.steps, max_epochs=-1,
        val_check_interval=c.val_every if validates else c.steps, check_val_every_n_epoch=None,
        limit_val_batches=c.val_batches if validates else 0,
        num_sanity_val_steps=min(2, c.val_batches) if validates else 0,
        log_every_n_steps=c.log_every, logger=CSVLogger(out_dir, name="logs"),
        callbacks=all_callbacks + list(callbacks or []), plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # StepCheckpoint does it (see training_callbacks.py)
        use_distributed_sampler=False,  # StepBatchSampler shards by rank itself
        default_root_dir=out_dir)
    resume = last_checkpoint(checkpoint_dir)
    if resume is not None:
        rank_zero_info(f"resuming from {resume}")
    if resume is not None and c.strategy == "fsdp":
        # FSDP reads a full checkpoint with Lightning's own unpickler, not through AtomicCheckpointIO
        # (which every other strategy uses): check first that the file is weights-only
        load_training_checkpoint(resume, mmap=True)
    if c.num_workers > 0:
        # tokenisation runs in the workers; a tokenizer used in threads before the fork would
        # otherwise make `tokenizers` warn and disable its parallelism itself
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    return _export(transformer_config, c, checkpoint_dir, out_dir / "transformer", trainer.is_global_zero)


def _strategy(config: TransformerTrainConfig) -> Any:
    if config.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # one FSDP unit per transformer block and one per TransformerLoss (raw, EMA: identical
        # sharding, see the module docstring); "full" checkpoints are single files, which
        # AtomicCheckpointIO writes and `_export` reads like any other
        return FSDPStrategy(auto_wrap_policy={Block, TransformerLoss}, state_dict_type="full")
    return config.strategy


def _export(transformer_config: TransformerConfig, config: TransformerTrainConfig, checkpoint_dir: Path,
            folder: Path, is_global_zero: bool) -> DalleTransformer:
    """Read the final weights back from last.ckpt (the same file for single-device, DDP and FSDP
    runs, and for a rerun of a finished run) and save them with save_pretrained (rank 0)."""
    path = last_checkpoint(checkpoint_dir)
    if path is None:
        raise FileNotFoundError(f"{checkpoint_dir}: training ended without writing {checkpoint_dir / 'last.ckpt'}")
    state = load_training_checkpoint(path, mmap=True)["state_dict"]
    prefix = "ema_model.transformer." if config.ema_decay > 0 else "model.transformer."
    model = DalleTransformer(transformer_config)
    load_state_dict_strict(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                           source=f"{path} (weights under '{prefix}')")
    if is_global_zero:
        model.save_pretrained(folder)
        rank_zero_info(f"exported the {'EMA' if config.ema_decay > 0 else 'final'} weights to {folder}")
    return model.eval()


def _init_from(model: DalleTransformer, path: str) -> None:
    """Load the weights of a saved transformer (or a pipeline folder's transformer/) into `model`,
    whose config must be the saved one's: fine-tuning starts from them. One difference is allowed: a
    model without a text encoder may start a run that adds one (`text_encoder_depth`); the new
    encoder blocks keep their identity init, so the run starts from the saved model's function."""
    folder = Path(path)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    source = DalleTransformer.from_pretrained(folder)  # names a missing or broken file itself
    if source.config.text_encoder_depth == 0 < model.config.text_encoder_depth and \
            dataclasses.replace(source.config, text_encoder_depth=model.config.text_encoder_depth) == model.config:
        encoder = {k: v for k, v in model.state_dict().items() if k.startswith("text_encoder.")}
        model.load_state_dict({**source.state_dict(), **encoder})
        rank_zero_info(f"initialised the transformer from {folder}, with {model.config.text_encoder_depth} "
                       "new identity text encoder blocks")
        return
    if source.config != model.config:
        differ = {k: (v, getattr(model.config, k)) for k, v in vars(source.config).items()
                  if getattr(model.config, k) != v}
        raise ValueError(f"training.init_from={path}: its transformer config differs from this run's in "
                         + ", ".join(f"{k} ({saved} saved, {ours} here)" for k, (saved, ours) in differ.items()))
    model.load_state_dict(source.state_dict())
    rank_zero_info(f"initialised the transformer from {folder}")
