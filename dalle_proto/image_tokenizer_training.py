"""Training the image tokenizer (VQGAN) on Lightning: reconstruction + codebook + patch-GAN losses.

    model = train_image_tokenizer(ImageTokenizerConfig(...), ImageTokenizerTrainConfig(...),
                                  train_dataset, eval_dataset, "runs/image_tokenizer")

Rerunning the same call in the same `out_dir` resumes from `out_dir/last.ckpt` exactly: the data
order is a pure function of (seed, sample index) and the sampler starts at the restored global step;
dead-code restarts draw from a generator seeded by (seed, step); every other piece of state (weights,
optimizer moments, code-usage counters) is in the checkpoint. The finished model is written to
`out_dir/image_tokenizer` (config.json + model.safetensors).

What keeps the codebook in use: low-dimensional L2-normalised codes (`l2norm_codes` in the model
config, LlamaGen's recipe) plus dead-code restarts: codes whose running usage falls below a fraction
of the uniform share are moved onto encoder outputs from the current batch, and their Adam moments
are zeroed. The discriminator (discriminator.py) switches on at `disc_start`.

One optimizer holds two parameter groups (image tokenizer, discriminator) and steps once per batch:
Lightning counts a manual-optimization global step per optimizer.step() call, so two optimizers
would double it. The discriminator's gradients come from its own loss only (its parameters are
frozen during the generator's backward), so one AdamW step equals two separate ones.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpointing import AtomicCheckpointIO, last_checkpoint
from .codebook_reviver import CodebookReviver
from .cpu_memory import retain_freed_memory
from .datasets.augmentation import DalleImageAugmentation
from .discriminator import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_adv_loss
from .image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from .image_tokenizer.quantizers import code_perplexity


@dataclass
class ImageTokenizerTrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max grad norm, per parameter group; 0 disables
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    edge_weight: float = 0.0  # L1 between image gradients: a cheap stand-in for a perceptual loss
    codebook_weight: float = 1.0
    commit_weight: float = 0.25
    disc_start: int = 1000  # step at which the GAN losses switch on; >= steps disables the GAN
    disc_weight: float = 0.1
    disc_adaptive: bool = True  # taming's adaptive weight times disc_weight; else disc_weight alone
    disc_loss: str = "hinge"  # "hinge" | "bce"
    disc_lr: float = 0.0  # 0: same as lr
    disc_ch: int = 32
    disc_layers: int = 2
    restart_dead_codes: bool = True
    restart_every: int = 20
    restart_threshold: float = 0.03  # dead: usage EMA below this fraction of a uniform share
    restart_until: float = 0.9  # fraction of `steps` after which codes stay put
    usage_decay: float = 0.99  # EMA decay of per-code usage counts
    log_every: int = 10
    image_every: int = 200  # reconstruction grid PNG into out_dir/images
    val_every: int = 500
    val_count: int = 256  # eval images used for validation metrics
    checkpoint_every: int = 200
    precision: str = "32-true"  # Lightning precision, e.g. "bf16-mixed" (measure on your CPU)
    channels_last: bool = True
    num_workers: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    seed: int = 0


# ---- data ------------------------------------------------------------------------------------

class _ImageTensors(Dataset):
    """(PIL image | tensor, caption) items -> float tensors (3, S, S) in [-1, 1]; captions dropped."""

    def __init__(self, dataset, size: int):
        self.dataset = dataset
        # Centre crop, no random augmentation: the tokenizer should see whole objects, and the
        # shapes set is already at the training resolution.
        self.center_crop = DalleImageAugmentation(size, train=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(image, Image.Image):
            return self.center_crop(image)  # (3, S, S)
        if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
            return image.float()
        raise TypeError(f"item {index} of {type(self.dataset).__name__}: expected a PIL image or a "
                        f"(3, H, W) tensor in [-1, 1], got {type(image).__name__}")


class StepSampler(Sampler[int]):
    """Sample order as a pure function of the global sample index, starting at a given step.

    Global sample k (k = (step * world_size + rank) * batch_size + i) is item perm_e[k mod N] with
    e = k // N and perm_e a permutation seeded by (seed, e): every data set item once per pass,
    a fresh order each pass, and a resumed run picks up exactly where the checkpoint left off.
    __len__ reports the whole run, so Lightning's batch counter (restored from the checkpoint) and
    the end of the sampler coincide at the last step.
    """

    def __init__(self, num_items: int, batch_size: int, steps: int, start_step: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.steps = num_items, batch_size, steps
        self.start_step, self.seed, self.rank, self.world_size = start_step, seed, rank, world_size
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def item(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=generator), epoch
        return int(self._perm[pos])

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            for i in range(self.batch_size):
                yield self.item(first + i)


# ---- metrics and images ------------------------------------------------------------------------

def psnr_db(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images, measured on the [0, 1] scale after clamping: (B,)."""
    mse = ((recon.float().clamp(-1, 1) - target.float()) / 2).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def save_reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | os.PathLike) -> Path:
    """PNG with the originals on the top row and their reconstructions below (both (B, 3, H, W))."""
    rows = torch.stack([originals, recons.clamp(-1, 1)]).float()  # (2, B, 3, H, W)
    pixels = ((rows + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    _, b, _, h, w = pixels.shape
    grid = pixels.permute(0, 3, 1, 4, 2).reshape(2 * h, b * w, 3)  # (2H, B*W, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)  # a viewer never sees half a file
    return path


def _edge_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    def grads(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    (rx, ry), (tx, ty) = grads(recon), grads(target)
    return (rx - tx).abs().mean() + (ry - ty).abs().mean()


# ---- the LightningModule -----------------------------------------------------------------------

class ImageTokenizerModule(pl.LightningModule):
    def __init__(self, model_config: ImageTokenizerConfig, train_config: ImageTokenizerTrainConfig,
                 train_dataset=None, eval_dataset=None, out_dir: str | os.PathLike = "."):
        super().__init__()
        if model_config.kind != "vqgan":
            raise ValueError(f"train_image_tokenizer trains kind 'vqgan' only, got kind={model_config.kind!r}")
        self.model_config, self.cfg = model_config, train_config
        self.train_dataset, self.eval_dataset, self.out_dir = train_dataset, eval_dataset, Path(out_dir)
        self.automatic_optimization = False
        self.model = ImageTokenizer(model_config)
        self.discriminator = PatchDiscriminator(model_config.out_ch, train_config.disc_ch, train_config.disc_layers)
        if train_config.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        self.reviver = CodebookReviver(model_config.n_embed, train_config.usage_decay,
                                       train_config.restart_threshold, train_config.seed)
        self._val_counts = torch.zeros(model_config.n_embed)
        self._val_psnr: list[torch.Tensor] = []
        self._fixed_images: torch.Tensor | None = None

    # -- data
    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        trainer = self.trainer
        # Called after Lightning restored the checkpoint, so global_step is where we resume.
        sampler = StepSampler(len(self.train_dataset), cfg.batch_size, cfg.steps,
                              start_step=trainer.global_step, seed=cfg.seed,
                              rank=trainer.global_rank, world_size=trainer.world_size)
        return DataLoader(_ImageTensors(self.train_dataset, self.model_config.resolution),
                          batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                          drop_last=True, persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        count = min(self.cfg.val_count, len(self.eval_dataset))
        subset = torch.utils.data.Subset(_ImageTensors(self.eval_dataset, self.model_config.resolution),
                                         range(count))
        return DataLoader(subset, batch_size=max(self.cfg.batch_size, 32), shuffle=False,
                          num_workers=self.cfg.num_workers)

    # -- optimisation
    def configure_optimizers(self):
        cfg = self.cfg
        groups = [{"params": list(self.model.parameters()), "lr": cfg.lr, "name": "image_tokenizer"},
                  {"params": list(self.discriminator.parameters()), "lr": cfg.disc_lr or cfg.lr,
                   "name": "discriminator"}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over `warmup` steps, then cosine decay to `min_lr_ratio` at `steps`."""
        cfg = self.cfg
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        cfg, step = self.cfg, self.global_step
        optimizer = self.optimizers()
        factor = self.lr_factor(step)
        gen_group, disc_group = optimizer.param_groups
        gen_group["lr"] = cfg.lr * factor
        disc_group["lr"] = (cfg.disc_lr or cfg.lr) * factor
        images = self._prepare(images)  # (B, 3, H, W)

        z = self.model.encode_latents(images)  # (B, D, h, w)
        z_q, ids, aux = self.model.quantize_latents(z)
        recon = self.model.decode_latents(z_q)  # (B, 3, H, W)
        diff = recon.float() - images.float()
        rec_loss = cfg.l1_weight * diff.abs().mean() + cfg.l2_weight * diff.pow(2).mean()
        if cfg.edge_weight > 0:
            rec_loss = rec_loss + cfg.edge_weight * _edge_loss(recon.float(), images.float())
        quant_loss = cfg.codebook_weight * aux["codebook_loss"] + cfg.commit_weight * aux["commit_loss"]
        loss = rec_loss + quant_loss

        gan_on = step >= cfg.disc_start
        if gan_on:
            self.discriminator.requires_grad_(False)  # generator backward leaves D's grads alone
            adv = generator_adv_loss(self.discriminator(recon).float(), cfg.disc_loss)
            if cfg.disc_adaptive:
                weight = cfg.disc_weight * adaptive_weight(rec_loss, adv, self.model.decoder.conv_out.weight)
            else:
                weight = torch.tensor(cfg.disc_weight)
            loss = loss + weight * adv
            self.discriminator.requires_grad_(True)

        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if gan_on:
            logits_real = self.discriminator(images.detach()).float()
            logits_fake = self.discriminator(recon.detach()).float()
            d_loss = discriminator_loss(logits_real, logits_fake, cfg.disc_loss)
            self.manual_backward(d_loss)
        if cfg.grad_clip > 0:
            for group in optimizer.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

        restarted = self._track_usage_and_restart(z.detach(), ids, optimizer.optimizer, step)
        with torch.no_grad():
            psnr = psnr_db(recon.detach(), images).mean()
        self.log_dict({"train/loss": loss.detach(), "train/rec_loss": rec_loss.detach(),
                       "train/psnr": psnr, "lr": gen_group["lr"]}, prog_bar=True)
        self.log_dict({"train/commit_loss": aux["commit_loss"].detach(),
                       "train/codebook_loss": aux["codebook_loss"].detach(),
                       "train/batch_perplexity": aux["perplexity"], "train/restarted": float(restarted)})
        if gan_on:
            self.log_dict({"train/d_loss": d_loss.detach(), "train/g_adv": adv.detach(),
                           "train/disc_weight": weight.detach()})
        if (step + 1) % cfg.log_every == 0:
            used, ppl = self.reviver.window_stats()
            self.log_dict({"train/codebook_usage": used, "train/perplexity": ppl}, prog_bar=True)
        if cfg.image_every > 0 and (step + 1) % cfg.image_every == 0 and self.global_rank == 0:
            self.save_images(step + 1)
        return loss.detach()

    @torch.no_grad()
    def _track_usage_and_restart(self, z: torch.Tensor, ids: torch.Tensor,
                                 optimizer: torch.optim.Optimizer, step: int) -> int:
        cfg, world = self.cfg, self.trainer.world_size
        counts = torch.bincount(ids.flatten(), minlength=self.model_config.n_embed).float()  # (n,)
        if world > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.reviver.update(counts)
        if not (cfg.restart_dead_codes and (step + 1) % cfg.restart_every == 0
                and step < cfg.restart_until * cfg.steps):
            return 0
        restarted = self.reviver.restart(self.model.quantize, z, ids.numel() * world, step, optimizer)
        if restarted and world > 1:  # every rank must keep rank 0's codebook
            weight = self.model.quantize.embedding.weight
            weight.data.copy_(self.trainer.strategy.broadcast(weight.data, src=0))
        return restarted

    # -- validation: PSNR and codebook usage over `val_count` eval images
    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(self.model_config.n_embed, device=self.device)
        self._val_psnr = []

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        images = self._prepare(images)
        recon, ids, _ = self.model(images)
        self._val_psnr.append(psnr_db(recon, images))
        self._val_counts += torch.bincount(ids.flatten(), minlength=self.model_config.n_embed).float()
        if batch_idx == 0:
            self._fixed_images = images[:8].detach().cpu().contiguous()

    def on_validation_epoch_end(self) -> None:
        if not self._val_psnr:
            return
        self.log_dict({"val/psnr": torch.cat(self._val_psnr).mean(),
                       "val/codebook_usage": (self._val_counts > 0).float().mean(),
                       "val/perplexity": float(code_perplexity(self._val_counts))}, prog_bar=True)

    @torch.no_grad()
    def save_images(self, step: int) -> Path:
        if self._fixed_images is None:
            images = [_ImageTensors(self.eval_dataset, self.model_config.resolution)[i]
                      for i in range(min(8, len(self.eval_dataset)))]
            self._fixed_images = torch.stack(images)  # (8, 3, H, W)
        was_training = self.model.training
        self.model.eval()
        recon, _, _ = self.model(self._prepare(self._fixed_images.to(self.device)))
        self.model.train(was_training)
        return save_reconstruction_grid(self._fixed_images, recon.float().cpu().contiguous(),
                                        self.out_dir / "images" / f"recon_step{step:07d}.png")

    # -- checkpoint bookkeeping: refuse to resume a run of a different model
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["image_tokenizer_config"] = dataclasses.asdict(self.model_config)
        checkpoint["image_tokenizer_train_config"] = dataclasses.asdict(self.cfg)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("image_tokenizer_config")
        current = dataclasses.asdict(self.model_config)
        if saved is not None and saved != current:
            changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            raise ValueError(f"cannot resume: the checkpoint in {self.out_dir} was trained with a different "
                             f"image tokenizer config (field: (checkpoint, now)) {changed}; "
                             f"use a new out_dir or the old config")


def train_image_tokenizer(model_config: ImageTokenizerConfig, train_config: ImageTokenizerTrainConfig,
                          train_dataset, eval_dataset, out_dir: str | os.PathLike, *,
                          max_steps: int | None = None, progress: bool = True,
                          accelerator: str = "auto", devices: int | str = "auto") -> ImageTokenizer:
    """Train (or resume, if `out_dir/last.ckpt` exists) and save `out_dir/image_tokenizer`.

    `max_steps` stops early at that global step while the lr schedule still spans
    `train_config.steps` (a time-boxed run you can resume later, or a simulated interruption).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = train_config
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise ValueError("train_image_tokenizer: train_dataset and eval_dataset must not be empty")
    threads_before = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)  # restored below: the caller's later work keeps its threads
    try:
        return _fit(model_config, cfg, train_dataset, eval_dataset, out_dir, accelerator, devices, progress,
                    max_steps)
    finally:
        torch.set_num_threads(threads_before)


def _fit(model_config: ImageTokenizerConfig, cfg: ImageTokenizerTrainConfig, train_dataset, eval_dataset,
         out_dir: Path, accelerator: str, devices: int | str, progress: bool, max_steps: int | None) -> ImageTokenizer:
    """The body of `train_image_tokenizer`, run with its thread count."""
    retain_freed_memory()  # no page faults on the per-step activation buffers (cpu_memory.py)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = ImageTokenizerModule(model_config, cfg, train_dataset, eval_dataset, out_dir)
    checkpoint = ModelCheckpoint(dirpath=out_dir, filename="step{step:07d}", save_top_k=0, save_last=True,
                                 every_n_train_steps=cfg.checkpoint_every, enable_version_counter=False)
    stop = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
    trainer = pl.Trainer(
        max_steps=stop, max_epochs=-1, accelerator=accelerator, devices=devices,
        precision=cfg.precision, plugins=[AtomicCheckpointIO()], callbacks=[checkpoint],
        # A fresh logs/version_N per (re)start: CSVLogger would delete an existing metrics.csv.
        logger=CSVLogger(save_dir=out_dir, name="logs"), log_every_n_steps=cfg.log_every,
        val_check_interval=cfg.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
        deterministic=False, default_root_dir=out_dir)
    resume_from = last_checkpoint(out_dir)
    with warnings.catch_warnings():
        # StepSampler resumes mid-epoch exactly, which Lightning cannot see; silence its warning.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Checkpoints hold the state after the step's update, which is what resuming needs.
        warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
        trainer.fit(module, ckpt_path=str(resume_from) if resume_from else None)
    if trainer.global_step % cfg.checkpoint_every != 0 and trainer.global_step > 0:
        trainer.save_checkpoint(out_dir / "last.ckpt")  # the final step, for an exact later resume
    model = module.model.to(memory_format=torch.contiguous_format).eval()
    if trainer.global_rank == 0:
        model.save_pretrained(out_dir / "image_tokenizer")
    return model
