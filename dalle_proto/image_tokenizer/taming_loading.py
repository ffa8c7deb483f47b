"""Loading taming-transformers VQGAN checkpoints (VQModel and GumbelVQ) into ImageTokenizer, strictly.

Inputs are the two files taming ships per model: the yaml (`model.target`, `model.params.{embed_dim,
n_embed, ddconfig, ...}`) and the Lightning `.ckpt` (weights under `state_dict`; `loss.*` keys are
the LPIPS/discriminator training loss, not the autoencoder, and are dropped).

The codebook size is checked before anything else: editing `n_embed` in a yaml does not change a
checkpoint's codebook, and a 1024-code checkpoint pushed through an 8192-code config used to load
"fine" with strict=False and produce garbage. Every other mismatch fails the strict load with the
offending keys named.
"""
from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from dalle_proto.pretrained import load_state_dict_strict

from .unpickling import restricted_torch_load

if TYPE_CHECKING:
    from .model import ImageTokenizer

VQ_CODEBOOK_KEY = "quantize.embedding.weight"  # VQModel: [n_embed, embed_dim]
GUMBEL_CODEBOOK_KEY = "quantize.embed.weight"  # GumbelVQ: [n_embed, embed_dim]
GUMBEL_PROJ_KEY = "quantize.proj.weight"  # GumbelVQ: [n_embed, z_channels, 1, 1]
DDCONFIG_KEYS = ("z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                 "num_res_blocks", "attn_resolutions")


def read_lightning_state_dict(ckpt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint (or a bare state dict), all tensors, on the CPU.

    First tries torch's weights-only loader. Checkpoints written by the pytorch-lightning 1.x that
    taming used also pickle callback classes and hyper-parameter objects, which weights_only=True
    rejects; those are re-read with a restricted unpickler that rebuilds tensors and turns every
    other object into an inert placeholder (no import of pytorch_lightning, no code from the file).
    """
    path = str(ckpt_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"taming checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            ckpt = restricted_torch_load(path)
        except Exception as e:
            raise ValueError(f"{path}: could not read as a Lightning/torch checkpoint: {e}") from e
    except Exception as e:
        raise ValueError(f"{path}: could not read as a Lightning/torch checkpoint: {e}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state_dict = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict = ckpt  # a bare state dict
    else:
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a Lightning checkpoint with a 'state_dict' entry, found {found}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entries that are not tensors: {bad[:10]}")
    return dict(state_dict)


def _read_yaml(config_yaml: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(model.target, model.params as plain dict) from a taming yaml, with required keys checked."""
    path = str(config_yaml)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"taming config not found: {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise ValueError(f"{path}: expected a taming config with model.target and model.params")
    params = model["params"]
    missing = [k for k in ("embed_dim", "n_embed", "ddconfig") if k not in params]
    ddconfig = params.get("ddconfig") or {}
    missing += [f"ddconfig.{k}" for k in DDCONFIG_KEYS if k not in ddconfig]
    if missing:
        raise ValueError(f"{path}: model.params is missing {missing}")
    if ddconfig.get("double_z", False):
        raise ValueError(f"{path}: ddconfig.double_z is true; that is a KL autoencoder, not a VQGAN")
    if params.get("remap") is not None:
        raise ValueError(f"{path}: codebook remapping (model.params.remap) is not supported")
    return str(model.get("target", "")), params


def _kind(target: str, state_dict: dict[str, torch.Tensor], config_yaml: str, ckpt_path: str) -> str:
    by_keys = ("gumbel" if GUMBEL_PROJ_KEY in state_dict or GUMBEL_CODEBOOK_KEY in state_dict
               else "vqgan" if VQ_CODEBOOK_KEY in state_dict else None)
    if by_keys is None:
        raise ValueError(f"{ckpt_path}: no codebook found (neither {VQ_CODEBOOK_KEY} nor "
                         f"{GUMBEL_CODEBOOK_KEY}); is this a taming VQGAN checkpoint?")
    by_target = "gumbel" if target.endswith("GumbelVQ") else "vqgan" if target.endswith("VQModel") else None
    if by_target is not None and by_target != by_keys:
        raise ValueError(f"{config_yaml} says model.target {target} but {ckpt_path} holds a "
                         f"{'GumbelVQ' if by_keys == 'gumbel' else 'VQModel'} codebook; use the matching pair")
    return by_keys


def load_taming(config_yaml: str | os.PathLike, ckpt_path: str | os.PathLike) -> "ImageTokenizer":
    """taming yaml + Lightning .ckpt (VQModel or GumbelVQ) -> ImageTokenizer in eval mode.

    Raises ValueError naming both numbers and both files when the yaml's n_embed differs from the
    checkpoint's codebook rows, and the strict-load error (keys named) for any other mismatch.
    """
    from .model import ImageTokenizer, ImageTokenizerConfig

    config_yaml, ckpt_path = str(config_yaml), str(ckpt_path)
    target, params = _read_yaml(config_yaml)
    state_dict = {k: v for k, v in read_lightning_state_dict(ckpt_path).items() if not k.startswith("loss.")}
    kind = _kind(target, state_dict, config_yaml, ckpt_path)

    codebook_key = GUMBEL_CODEBOOK_KEY if kind == "gumbel" else VQ_CODEBOOK_KEY
    if codebook_key not in state_dict:  # a GumbelVQ file missing its embed: size it by its proj
        codebook_key = GUMBEL_PROJ_KEY
    ckpt_codes = state_dict[codebook_key].shape[0]
    yaml_codes = int(params["n_embed"])
    if ckpt_codes != yaml_codes:
        raise ValueError(
            f"codebook size mismatch: checkpoint {ckpt_path} has {ckpt_codes} codes ({codebook_key} "
            f"{tuple(state_dict[codebook_key].shape)}) but config "
            f"{config_yaml} says n_embed: {yaml_codes}. Editing n_embed does not change a checkpoint's "
            f"codebook; use the yaml shipped with this checkpoint.")

    dd = params["ddconfig"]
    config = ImageTokenizerConfig(
        kind=kind, resolution=int(dd["resolution"]), in_channels=int(dd["in_channels"]),
        out_ch=int(dd["out_ch"]), ch=int(dd["ch"]), ch_mult=list(dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=list(dd["attn_resolutions"]),
        z_channels=int(dd["z_channels"]), embed_dim=int(params["embed_dim"]), n_embed=yaml_codes,
        dropout=float(dd.get("dropout", 0.0)), kl_weight=float(params.get("kl_weight", 1e-8)))
    model = ImageTokenizer(config)
    load_state_dict_strict(model, state_dict, source=f"{ckpt_path} (config {config_yaml})")
    return model.eval()
