"""Training the small CLIP (clip.py) on (image, caption) pairs with Lightning.

    clip = train_clip(ClipConfig(...), ClipTrainConfig(steps=2000), text_tokenizer,
                      ShapesDataset(20000, size=64), "runs/shapes/clip_training")

Any data set of the project works (shapes, emoji, folder, COCO: map-style, yielding (PIL image,
caption)); images are centre-cropped and resized to `image_size`, captions tokenised in eval mode
(no BPE dropout, so the ids, and a resumed run, are reproducible).

Loss: CLIP's symmetric InfoNCE over the batch: image i against every caption (cross-entropy with
target i) plus caption i against every image, averaged. Pairs whose captions are identical (the
shapes set repeats "a red circle") are not counted as negatives of each other.

Caption negatives (`caption_negatives` k > 0, shapes captions only): every caption of the batch gets
k perturbed copies with one attribute changed through the grammar (a colour, a shape, the size, the
position, the relation, the two objects swapped, the number; with `exchange_negatives`, also the
two objects' colours or shapes exchanged); they join the image->text side as extra negatives for
every image of the batch. Random in-batch captions rarely differ from the true
one in a single word, so without these the model can get away with a bag of words; with them it
learns to bind colour to shape and read the relation (`benchmarks/reranking.py` measures it; it
needs a text encoder that sees word order, see `clip.TextEncoder`). A perturbation never names a held-out colour-shape
pair (SHAPES.md: those never appear in training captions). `train/hard_acc` logs how often an image
scores its own caption above all of its own perturbations.

Image negatives (`image_negatives` k > 0, shapes captions only): the same perturbations, rendered
(`render_caption`), join the caption->image side as extra negatives of the caption they were made
from. Reranking compares images for one caption, and a sampled image usually misses by one attribute
(two objects swapped, one colour wrong); caption negatives alone teach the image->text direction,
these teach the direction reranking uses. `train/hard_image_acc` logs how often a caption scores
its own image above all of its rendered perturbations. Measured on the shapes model (BENCHMARKS.md,
"Reranking", before the text-encoder fix): 2 image negatives made training 3.4x slower and did not
make the CLIP tell a pair from its swapped version, so the shipped config leaves them off.

Copy negatives (`copy_negatives` k > 0, pair captions only): renders of the pair with one object's
colour or shape copied onto the other, also on the caption->image side. Sampled pairs often draw
one shape twice ("a black diamond below a black triangle" as two black triangles); the grammar
never repeats an object, so without these no training image shows the CLIP what is wrong with that.

The run folder `out_dir` gets `checkpoints/last.ckpt` (atomic, every `checkpoint_every` steps and
at the end; calling train_clip again resumes exactly), `logs/version_N/metrics.csv` (loss, in-batch
accuracy, hard accuracy, temperature, lr) and `clip/` (config.json + model.safetensors).
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import Dataset, IterableDataset

from dalle_proto.caption_perturbations import perturb_caption  # noqa: F401 (re-exported)
from dalle_proto.checkpointing import AtomicCheckpointIO, last_checkpoint, load_training_checkpoint
from dalle_proto.clip import ClipConfig, ClipModel
from dalle_proto.cpu_memory import retain_freed_memory
from dalle_proto.datasets.augmentation import DalleImageAugmentation
from dalle_proto.datasets.shapes import render_caption
from dalle_proto.pretrained import load_state_dict_strict
from dalle_proto.text_tokenizer import TruncationReportedOnce
from dalle_proto.training_callbacks import StepCheckpoint
from dalle_proto.transformer_data import ResumableDataLoader, StepBatchSampler, step_rng

_PERTURB = 3  # step_rng purpose of the caption perturbations (0-2 are transformer_data's)
_PERTURB_IMAGE = 4  # step_rng purpose of the rendered perturbations
_PERTURB_COPY = 5  # step_rng purpose of the rendered copy perturbations


@dataclass
class ClipTrainConfig:
    steps: int = 3000  # optimizer updates
    batch_size: int = 64  # the contrastive batch: more captions per step = more negatives
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.1  # Linear and conv weights only
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    caption_negatives: int = 2  # perturbed copies per shapes caption as extra negatives; 0 disables
    image_negatives: int = 0  # renders of perturbed captions per shapes caption as extra negatives
    exchange_negatives: bool = False  # pair perturbations may also exchange the objects' colours / shapes
    copy_negatives: int = 0  # renders per pair caption with one object's colour or shape copied onto the other
    members: int = 1  # > 1: that many CLIPs, seeds seed, seed+1, ..., saved as one ClipEnsemble
    precision: str = "32-true"  # any Lightning precision string
    log_every: int = 20
    checkpoint_every: int = 500
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int = 1

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (a contrastive batch needs negatives)"),
            (self.lr > 0, "lr must be > 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two values in [0, 1)"),
            (self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1,
             "warmup_steps must be >= 0 and min_lr_ratio in [0, 1]"),
            (min(self.grad_clip, self.caption_negatives, self.image_negatives, self.copy_negatives,
                 self.num_workers) >= 0,
             "grad_clip, caption_negatives, image_negatives, copy_negatives and num_workers must be >= 0"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
            (self.members >= 1, "members must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ClipTrainConfig: {message}; got {self}")


def lr_at(config: ClipTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- data --------------------------------------------------------------------------------------
class KeyedPairs(Dataset):
    """A key (step, slot, index, pass) of StepBatchSampler -> (step, slot, image (3, S, S), caption)."""

    def __init__(self, dataset: Dataset, image_size: int):
        self.dataset = dataset
        self.to_tensor = DalleImageAugmentation(image_size, train=False)  # centre crop, deterministic

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[int, int, torch.Tensor, str]:
        step, slot, index, pass_number = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(pass_number)
        image, caption = self.dataset[index]
        if isinstance(image, torch.Tensor):
            return step, slot, image.float(), caption
        return step, slot, self.to_tensor(image), caption


class ClipCollate:
    """Samples -> {"images" (B, 3, S, S), "text_ids" (B, T), "negative_ids" (M, T), "negative_owner" (M,),
    "negative_images" (N, 3, S, S), "negative_image_owner" (N,)}."""

    def __init__(self, text_tokenizer: Any, caption_negatives: int, seed: int, image_negatives: int = 0,
                 to_tensor: Any = None, exchanges: bool = False, copy_negatives: int = 0):
        self.text_tokenizer, self.caption_negatives, self.seed = text_tokenizer, caption_negatives, seed
        self.image_negatives, self.to_tensor, self.exchanges = image_negatives, to_tensor, exchanges
        self.copy_negatives = copy_negatives
        self.report_truncation = TruncationReportedOnce("this CLIP run's batches")

    def __call__(self, samples: list[tuple[int, int, torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        steps, slots, images, captions = zip(*samples)
        negatives, owners, _ = self._perturbations(steps, slots, captions, self.caption_negatives, _PERTURB)
        side = images[0].shape[-1]
        renders, render_owners, layouts = self._perturbations(steps, slots, captions, self.image_negatives,
                                                              _PERTURB_IMAGE, layouts=True)
        copied, copy_owners, copy_layouts = self._perturbations(steps, slots, captions, self.copy_negatives,
                                                                _PERTURB_COPY, layouts=True, copies=True)
        renders, render_owners, layouts = renders + copied, render_owners + copy_owners, layouts + copy_layouts
        negative_images = [self.to_tensor(render_caption(text, seed=layout, size=side).image)
                           for text, layout in zip(renders, layouts)]
        tokenizer = self.text_tokenizer.eval()
        with self.report_truncation():
            text_ids, negative_ids = tokenizer.encode(list(captions)), tokenizer.encode(negatives)  # (B, T), (M, T)
        return {"images": torch.stack(images),  # (B, 3, S, S)
                "text_ids": text_ids,  # (B, T)
                "negative_ids": negative_ids,  # (M, T)
                "negative_owner": torch.tensor(owners, dtype=torch.long),  # (M,)
                "negative_images": (torch.stack(negative_images) if negative_images
                                    else torch.zeros(0, *images[0].shape)),  # (N, 3, S, S)
                "negative_image_owner": torch.tensor(render_owners, dtype=torch.long)}  # (N,)

    def _perturbations(self, steps, slots, captions, k: int, purpose: int, layouts: bool = False,
                       copies: bool = False):
        """k perturbations of each caption -> (texts, owner index of each, a render seed for each if
        `layouts`: drawn only then, so the caption negatives' random stream stays what it was)."""
        texts, owners, seeds = [], [], []
        for i, (step, slot, caption) in enumerate(zip(steps, slots, captions)):
            rng = step_rng(self.seed, step, slot, purpose)
            for _ in range(k):
                if (text := perturb_caption(caption, rng, exchanges=self.exchanges, copies=copies)) is not None:
                    texts.append(text)
                    owners.append(i)
                    if layouts:
                        seeds.append(int(rng.integers(2**31)))
        return texts, owners, seeds


class ClipBatches(pl.LightningDataModule):
    def __init__(self, dataset: Dataset, text_tokenizer: Any, image_size: int, config: ClipTrainConfig):
        super().__init__()
        self.dataset, self.text_tokenizer, self.image_size, self.config = dataset, text_tokenizer, image_size, config

    def train_dataloader(self) -> ResumableDataLoader:
        c, trainer = self.config, self.trainer
        sampler = StepBatchSampler(range(len(self.dataset)), c.batch_size, c.steps, c.seed, trainer.global_rank,
                                   trainer.world_size, start_step=lambda: trainer.global_step)
        pairs = KeyedPairs(self.dataset, self.image_size)
        # rendered negatives go through the same image transform as the batch's own images
        return ResumableDataLoader(pairs, batch_sampler=sampler,
                                   num_workers=c.num_workers, persistent_workers=c.num_workers > 0,
                                   collate_fn=ClipCollate(self.text_tokenizer, c.caption_negatives, c.seed,
                                                          c.image_negatives, pairs.to_tensor, c.exchange_negatives,
                                                          c.copy_negatives))


# ---- the loss ----------------------------------------------------------------------------------
def clip_loss(model: ClipModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE with identical captions unmasked as negatives and the caption negatives
    added on the image->text side, the image negatives on the caption->image side. Returns (loss, {"acc",
    "hard_acc", "hard_image_acc"}) (the hard accuracies: NaN without the negatives they measure)."""
    text_ids, negative_ids, owner = batch["text_ids"], batch["negative_ids"], batch["negative_owner"]
    b = len(text_ids)
    image_emb, text_emb = model(batch["images"], text_ids)  # (B, E), (B, E)
    scale = model.temperature_scale()
    eye = torch.eye(b, dtype=torch.bool, device=text_ids.device)
    same_caption = (text_ids[:, None] == text_ids[None]).all(-1) & ~eye  # (B, B)
    logits = (scale * image_emb @ text_emb.T).masked_fill(same_caption, float("-inf"))  # (B, B)
    target = torch.arange(b, device=text_ids.device)
    image_to_text = logits
    hard_acc = torch.tensor(float("nan"))
    if len(negative_ids):
        negative_emb = model.encode_text(negative_ids)  # (M, E)
        negative_sim = image_emb @ negative_emb.T  # (B, M)
        is_true = (text_ids[:, None] == negative_ids[None]).all(-1)  # a negative that is an image's own caption
        image_to_text = torch.cat([logits, (scale * negative_sim).masked_fill(is_true, float("-inf"))], dim=1)
        with torch.no_grad():
            own = owner[None] == target[:, None]  # (B, M): image i's own perturbations
            best_own = negative_sim.masked_fill(~own | is_true, float("-inf")).amax(1)  # (B,)
            has = own.any(1)
            hard_acc = ((image_emb * text_emb).sum(-1) > best_own)[has].float().mean()
    text_to_image = logits.T  # (B, B)
    hard_image_acc = torch.tensor(float("nan"))
    negative_images, image_owner = batch.get("negative_images"), batch.get("negative_image_owner")
    if negative_images is not None and len(negative_images):
        own = image_owner[None] == target[:, None]  # (B, N): caption i's own rendered perturbations
        negative_sim = text_emb @ model.encode_image(negative_images).T  # (B, N)
        text_to_image = torch.cat([text_to_image, (scale * negative_sim).masked_fill(~own, float("-inf"))], dim=1)
        with torch.no_grad():
            best_own = negative_sim.masked_fill(~own, float("-inf")).amax(1)  # (B,)
            hard_image_acc = ((image_emb * text_emb).sum(-1) > best_own)[own.any(1)].float().mean()
    loss = (F.cross_entropy(image_to_text, target) + F.cross_entropy(text_to_image, target)) / 2
    with torch.no_grad():
        acc = ((image_to_text.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()) / 2
    return loss, {"acc": acc, "hard_acc": hard_acc, "hard_image_acc": hard_image_acc}


class ClipLightningModule(pl.LightningModule):
    def __init__(self, model: ClipModel, config: ClipTrainConfig):
        super().__init__()
        self.model, self.config = model, config

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay_ids = {id(m.weight) for m in self.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": self.config.weight_decay},
                  {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr_at(self.config, 0), betas=tuple(self.config.betas))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for group in self.optimizers(use_pl_optimizer=False).param_groups:
            group["lr"] = lr_at(self.config, self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = clip_loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", metrics["acc"], prog_bar=True)
        for name in ("hard_acc", "hard_image_acc"):
            if not torch.isnan(metrics[name]):
                self.log(f"train/{name}", metrics[name], prog_bar=True)
        self.log("train/temperature", 1.0 / self.model.temperature_scale().detach())
        self.log("lr", self.optimizers(use_pl_optimizer=False).param_groups[0]["lr"])
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["clip_config"] = dataclasses.asdict(self.model.config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, current = checkpoint.get("clip_config"), dataclasses.asdict(self.model.config)
        if saved is not None and saved != current:
            changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            raise ValueError(f"cannot resume: the checkpoint was trained with a different ClipConfig "
                             f"(field: (checkpoint, now)) {changed}; use a new out_dir or the old config")


# ---- the entry point -----------------------------------------------------------------------------
def train_clip(clip_config: ClipConfig, train_config: ClipTrainConfig, text_tokenizer: Any, dataset: Dataset,
               out_dir: str | os.PathLike, *, max_steps: int | None = None, progress: bool = True,
               callbacks: list[pl.Callback] | None = None) -> ClipModel:
    """Train (or resume, when `out_dir/checkpoints/last.ckpt` exists) and export `out_dir/clip`.

    `max_steps` stops at that global step while the lr schedule still spans `train_config.steps`
    (a time-boxed run to resume later). Returns the model on the CPU in eval mode.
    """
    c, out_dir = train_config, Path(out_dir)
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"train_clip needs a map-style data set; {type(dataset).__name__} streams its items "
                         "(write it to a folder first)")
    if len(dataset) == 0:
        raise ValueError("train_clip: the data set is empty")
    if (text_tokenizer.total_vocab_size, text_tokenizer.text_len) != (clip_config.text_vocab_size,
                                                                     clip_config.text_len):
        raise ValueError(f"the text tokenizer has total_vocab_size={text_tokenizer.total_vocab_size}, "
                         f"text_len={text_tokenizer.text_len} but ClipConfig has text_vocab_size="
                         f"{clip_config.text_vocab_size}, text_len={clip_config.text_len}; they must match")
    retain_freed_memory()  # no page faults on the per-step activation buffers (cpu_memory.py)
    torch.manual_seed(c.seed)  # identical initial weights on every (re)start
    module = ClipLightningModule(ClipModel(clip_config), c)
    checkpoint_dir = out_dir / "checkpoints"
    trainer = pl.Trainer(
        accelerator=c.accelerator, devices=c.devices, precision=c.precision,
        max_steps=c.steps if max_steps is None else min(max_steps, c.steps), max_epochs=-1,
        gradient_clip_val=c.grad_clip or None, log_every_n_steps=c.log_every,
        logger=CSVLogger(out_dir, name="logs"), plugins=[AtomicCheckpointIO()],
        callbacks=[StepCheckpoint(checkpoint_dir, c.checkpoint_every), *(callbacks or [])],
        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=out_dir)
    resume = last_checkpoint(checkpoint_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=ClipBatches(dataset, text_tokenizer, clip_config.image_size, c),
                    ckpt_path=str(resume) if resume is not None else None)
    return _export(clip_config, checkpoint_dir, out_dir / "clip", trainer.is_global_zero)


def _export(clip_config: ClipConfig, checkpoint_dir: Path, folder: Path, is_global_zero: bool) -> ClipModel:
    """Read the final weights back from last.ckpt (also for a rerun of a finished run) and save them."""
    path = last_checkpoint(checkpoint_dir)
    if path is None:
        raise FileNotFoundError(f"{checkpoint_dir}: training ended without writing last.ckpt")
    state = load_training_checkpoint(path)["state_dict"]
    model = ClipModel(clip_config)
    load_state_dict_strict(model, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                           source=f"{path} (weights under 'model.')")
    if is_global_zero:
        model.save_pretrained(folder)
    return model.eval()
