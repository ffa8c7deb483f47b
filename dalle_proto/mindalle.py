"""Import kakaobrain's minDALL-E (1.3B) as an ordinary dalle_proto pipeline folder.

    convert_mindalle("1.3B", "models/mindalle")      # or: dalle-proto convert mindalle 1.3B models/mindalle
    pipe = DallePipeline.from_pretrained("models/mindalle")

SRC is the unpacked release tarball (`1.3B.tar.gz` unpacks to a folder `1.3B/`; SRC may also be
the folder that holds it), laid out as minDALL-E's `Dalle.from_pretrained` reads it:

    config.yaml                   OmegaConf: stage1 (VQGAN), stage2 (Transformer1d), dataset
    tokenizer/bpe-16k-vocab.json  CharBPE vocabulary  } `TextTokenizer.from_char_bpe`
    tokenizer/bpe-16k-merges.txt  CharBPE merges      }
    stage1_last.ckpt              {"state_dict": VQGAN weights}, keys without a prefix
    stage2_last.ckpt              {"state_dict": Transformer1d weights}, keys without a prefix

Checkpoints are read with `torch.load(weights_only=True)` only: nothing in them is unpickled beyond
tensors and containers. Keys and shapes are checked against what config.yaml implies before
anything is written; a missing file, key or a wrong shape is one BadSavedFileError line naming the
file and what was expected.

OUT gets text_tokenizer/ (kind "char_bpe", [PAD] padding to 64), image_tokenizer/ (kind "vqgan":
stage 1 is taming's f16 VQGAN, whose keys are ours as they stand), transformer/ and pipeline.json
(minDALL-E's sampling defaults: top-k 256, temperature 1, no guidance). Stage 2 maps onto
DalleTransformer with attention="full", image_position="raster" and text_pad_id=[PAD]'s id:

    tok_emb_txt / tok_emb_img / pos_emb_txt   text_embedding / image_embedding / text_position
    pos_emb_img                                image_position  (256 raster positions)
    blocks.i.ln1 / ln2                         blocks.i.norm_attn / norm_mlp
    blocks.i.attn.{query,key,value}            blocks.i.attn.qkv  (rows: q, then k, then v)
    blocks.i.attn.proj                         blocks.i.attn.out
    blocks.i.mlp.0 / mlp.2                     blocks.i.mlp.fc / mlp.proj  (exact GELU between)
    ln_f / head_txt / head_img                 final_norm / text_head / image_head

Its sequence layout is ours (text position 63 predicts image token 0; no sos), and so is the
cached sampler: text prefill, then one image token per step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from dalle_proto.pipeline import (IMAGE_TOKENIZER_DIR, PIPELINE_CONFIG_NAME, TEXT_TOKENIZER_DIR, TRANSFORMER_DIR,
                                  PipelineConfig, _check_parts)
from dalle_proto.pretrained import BadSavedFileError, atomic_write_bytes, save_component
from dalle_proto.text_tokenizer import TextTokenizer
from dalle_proto.transformer import DalleTransformer, TransformerConfig

CONFIG_FILE, STAGE1_FILE, STAGE2_FILE = "config.yaml", "stage1_last.ckpt", "stage2_last.ckpt"
VOCAB_FILE, MERGES_FILE = "tokenizer/bpe-16k-vocab.json", "tokenizer/bpe-16k-merges.txt"
RELEASE_DIR = "1.3B"  # what 1.3B.tar.gz unpacks to
SAMPLING_DEFAULTS = PipelineConfig(cfg_scale=1.0, temperature=1.0, top_k=256, top_p=None)

# minDALL-E's base config (dalle/utils/config.py), which its loader merges config.yaml over
DEFAULTS: dict[str, Any] = {
    "dataset": {"tokenizer_type": "CharBPE", "context_length": 64, "image_resolution": 256},
    "stage1": {"type": "vqgan", "embed_dim": 256, "n_embed": 16384, "hparams": {
        "double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "pdrop": 0.0}},
    "stage2": {"type": "transformer1d", "vocab_size_txt": 16384, "vocab_size_img": 16384, "hparams": {
        "embed_dim": 1536, "n_layers": 42, "n_heads": 24, "n_dense_layers": 42, "ctx_len_img": 256,
        "ctx_len_txt": 64, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "mlp_bias": True,
        "attn_bias": True, "gelu_use_approx": False}},
}


def find_release_files(src: str | os.PathLike) -> dict[str, Path]:
    """The five release files under SRC (or SRC/1.3B); BadSavedFileError for the first missing one."""
    root = Path(src)
    if not (root / CONFIG_FILE).is_file() and (root / RELEASE_DIR / CONFIG_FILE).is_file():
        root = root / RELEASE_DIR
    files = {name: root / name for name in (CONFIG_FILE, VOCAB_FILE, MERGES_FILE, STAGE1_FILE, STAGE2_FILE)}
    for name, path in files.items():
        if not path.is_file():
            raise BadSavedFileError(path, f"missing; expected minDALL-E's unpacked 1.3B.tar.gz in {root} with "
                                          f"{', '.join(files)}")
    return files


def read_config(path: Path) -> dict[str, Any]:
    """config.yaml merged over minDALL-E's defaults, as a plain dict, with the layout checked."""
    try:
        cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.load(path)), resolve=True)
    except Exception as e:  # yaml or merge errors
        raise BadSavedFileError(path, f"not a minDALL-E config ({e})") from e
    s1, s2, h2 = cfg["stage1"], cfg["stage2"], cfg["stage2"]["hparams"]
    checks = [
        (cfg["dataset"]["tokenizer_type"] == "CharBPE", f"dataset.tokenizer_type is "
         f"{cfg['dataset']['tokenizer_type']!r}; expected 'CharBPE'"),
        (s1["type"] == "vqgan" and not s1["hparams"]["double_z"], "expected stage1.type vqgan with double_z false"),
        (s2["type"] == "transformer1d", f"stage2.type is {s2['type']!r}; expected 'transformer1d'"),
        (h2["n_dense_layers"] == h2["n_layers"], "stage2.hparams.n_dense_layers must equal n_layers"),
        (not h2["gelu_use_approx"], "stage2.hparams.gelu_use_approx is true; only exact GELU is supported"),
        (h2["embed_dim"] % h2["n_heads"] == 0, "stage2.hparams.embed_dim must be a multiple of n_heads"),
        (h2["ctx_len_txt"] == cfg["dataset"]["context_length"], f"stage2.hparams.ctx_len_txt "
         f"{h2['ctx_len_txt']} differs from dataset.context_length {cfg['dataset']['context_length']}"),
        (s2["vocab_size_img"] == s1["n_embed"], f"stage2.vocab_size_img {s2['vocab_size_img']} differs from "
         f"stage1.n_embed {s1['n_embed']}"),
    ]
    for ok, problem in checks:
        if not ok:
            raise BadSavedFileError(path, problem)
    grid = s1["hparams"]["resolution"] // 2 ** (len(s1["hparams"]["ch_mult"]) - 1)
    if h2["ctx_len_img"] != grid * grid:
        raise BadSavedFileError(path, f"stage2.hparams.ctx_len_img is {h2['ctx_len_img']}, but stage 1 makes a "
                                      f"{grid}x{grid} token grid ({grid * grid})")
    return cfg


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning/torch checkpoint, via torch.load(weights_only=True) only."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no copy of 5 GB
        except RuntimeError as e:  # a legacy (non-zip) file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadSavedFileError(path, "holds objects that torch.load(weights_only=True) refuses "
                                      f"({str(e).splitlines()[0] if str(e) else e}); dalle_proto never unpickles "
                                      "them: re-save it as torch.save({'state_dict': state_dict}, path)") from e
    except Exception as e:
        raise BadSavedFileError(path, f"could not be read as a torch checkpoint ({e})") from e
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BadSavedFileError(path, f"expected a checkpoint with a 'state_dict' entry, found {found}")
    return dict(state)


def check_state(path: Path, state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected key with its shape and nothing else, or one line naming the first problem."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise BadSavedFileError(path, f"missing key {missing[0]!r} of shape {expected[missing[0]]}{more}")
    if unexpected:
        raise BadSavedFileError(path, f"unexpected key {unexpected[0]!r} ({len(unexpected)} in all); expected "
                                      "minDALL-E's layout as its config.yaml describes it")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise BadSavedFileError(path, f"key {key!r}: expected a float tensor of shape {shape}, got "
                                          f"{type(value).__name__} {getattr(value, 'dtype', '')}")
        if tuple(value.shape) != shape:
            raise BadSavedFileError(path, f"key {key!r}: expected shape {shape}, found {tuple(value.shape)}")


def stage2_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of minDALL-E's Transformer1d state dict, from config.yaml."""
    s2, h = cfg["stage2"], cfg["stage2"]["hparams"]
    d, vt, vi = h["embed_dim"], s2["vocab_size_txt"], s2["vocab_size_img"]
    shapes = {"tok_emb_img.weight": (vi, d), "tok_emb_txt.weight": (vt, d),
              "pos_emb_img.weight": (h["ctx_len_img"], d), "pos_emb_txt.weight": (h["ctx_len_txt"], d)}
    for i in range(h["n_layers"]):
        p = f"blocks.{i}."
        shapes.update({p + "ln1.weight": (d,), p + "ln1.bias": (d,), p + "ln2.weight": (d,), p + "ln2.bias": (d,)})
        for name in ("key", "query", "value", "proj"):
            shapes[f"{p}attn.{name}.weight"] = (d, d)
            if h["attn_bias"]:
                shapes[f"{p}attn.{name}.bias"] = (d,)
        shapes.update({p + "mlp.0.weight": (4 * d, d), p + "mlp.2.weight": (d, 4 * d)})
        if h["mlp_bias"]:
            shapes.update({p + "mlp.0.bias": (4 * d,), p + "mlp.2.bias": (d,)})
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,), "head_img.weight": (vi, d), "head_txt.weight": (vt, d)})
    return shapes


def transformer_config(cfg: dict[str, Any], pad_id: int) -> TransformerConfig:
    s2, h = cfg["stage2"], cfg["stage2"]["hparams"]
    return TransformerConfig(
        text_vocab_size=s2["vocab_size_txt"], text_len=h["ctx_len_txt"], image_vocab_size=s2["vocab_size_img"],
        image_grid=round(h["ctx_len_img"] ** 0.5), dim=h["embed_dim"], depth=h["n_layers"], heads=h["n_heads"],
        head_dim=h["embed_dim"] // h["n_heads"], mlp_ratio=4.0, attention="full", dropout=0.0,
        text_pad_id=pad_id, image_position="raster")


def image_tokenizer_config(cfg: dict[str, Any]) -> ImageTokenizerConfig:
    s1, h = cfg["stage1"], cfg["stage1"]["hparams"]
    return ImageTokenizerConfig(
        kind="vqgan", resolution=h["resolution"], in_channels=h["in_channels"], out_ch=h["out_ch"], ch=h["ch"],
        ch_mult=list(h["ch_mult"]), num_res_blocks=h["num_res_blocks"], attn_resolutions=list(h["attn_resolutions"]),
        z_channels=h["z_channels"], embed_dim=s1["embed_dim"], n_embed=s1["n_embed"], dropout=0.0)


# per block: minDALL-E's name -> ours (q/k/v are fused separately); biases: -> (ours, width in dims)
BLOCK_WEIGHTS = {"ln1.weight": "norm_attn.weight", "ln1.bias": "norm_attn.bias", "ln2.weight": "norm_mlp.weight",
                 "ln2.bias": "norm_mlp.bias", "attn.proj.weight": "attn.out.weight", "mlp.0.weight": "mlp.fc.weight",
                 "mlp.2.weight": "mlp.proj.weight"}
BLOCK_BIASES = {"attn.proj.bias": ("attn.out.bias", 1), "mlp.0.bias": ("mlp.fc.bias", 4),
                "mlp.2.bias": ("mlp.proj.bias", 1)}


def convert_stage2(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """minDALL-E's Transformer1d state dict (checked) -> DalleTransformer's; absent biases are zeros."""
    d = cfg["stage2"]["hparams"]["embed_dim"]

    def bias(key: str, size: int) -> torch.Tensor:  # attn_bias / mlp_bias false: a zero bias is the same
        return state[key] if key in state else torch.zeros(size, dtype=state["ln_f.weight"].dtype)

    out = {"text_embedding.weight": state["tok_emb_txt.weight"], "text_position": state["pos_emb_txt.weight"],
           "image_embedding.weight": state["tok_emb_img.weight"], "image_position": state["pos_emb_img.weight"],
           "final_norm.weight": state["ln_f.weight"], "final_norm.bias": state["ln_f.bias"],
           "text_head.weight": state["head_txt.weight"], "image_head.weight": state["head_img.weight"]}
    for i in range(cfg["stage2"]["hparams"]["n_layers"]):
        p = f"blocks.{i}."
        out.update({p + ours: state[p + theirs] for theirs, ours in BLOCK_WEIGHTS.items()})
        out.update({p + ours: bias(p + theirs, width * d) for theirs, (ours, width) in BLOCK_BIASES.items()})
        qkv = [f"{p}attn.{name}" for name in ("query", "key", "value")]  # our fused rows: q, then k, then v
        out[p + "attn.qkv.weight"] = torch.cat([state[k + ".weight"] for k in qkv])  # (3D, D)
        out[p + "attn.qkv.bias"] = torch.cat([bias(k + ".bias", d) for k in qkv])  # (3D,)
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def convert_mindalle(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """minDALL-E's release folder SRC -> pipeline folder OUT (see the module docstring); returns OUT.

    dtype casts the floating-point weights (None: as stored). OUT must not exist or be empty, so no
    part of an older model (a clip/, say) is picked up with the new one."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; choose a new output folder")
    files = find_release_files(src)
    cfg = read_config(files[CONFIG_FILE])
    text_tokenizer = TextTokenizer.from_char_bpe(files[VOCAB_FILE], files[MERGES_FILE],
                                                 text_len=cfg["dataset"]["context_length"], lowercase=True)
    if text_tokenizer.vocab_size != cfg["stage2"]["vocab_size_txt"]:
        raise BadSavedFileError(files[VOCAB_FILE], f"gives {text_tokenizer.vocab_size} text ids with [PAD], but "
                                                   f"{files[CONFIG_FILE]} says stage2.vocab_size_txt: "
                                                   f"{cfg['stage2']['vocab_size_txt']}")
    try:
        image_config, transformer_cfg = image_tokenizer_config(cfg), transformer_config(cfg, text_tokenizer.pad_id)
    except (TypeError, ValueError) as e:  # the configs' own checks
        raise BadSavedFileError(files[CONFIG_FILE], f"does not describe a model dalle_proto can build ({e})") from e
    with torch.device("meta"):  # shapes and part checks without allocating 1.3B parameters
        image_tokenizer, transformer = ImageTokenizer(image_config), DalleTransformer(transformer_cfg)
    _check_parts(text_tokenizer, image_tokenizer, transformer, None, source=str(files[CONFIG_FILE]))

    stage1 = read_state_dict(files[STAGE1_FILE])
    check_state(files[STAGE1_FILE], stage1, _shapes(image_tokenizer))
    stage2 = read_state_dict(files[STAGE2_FILE])
    check_state(files[STAGE2_FILE], stage2, stage2_shapes(cfg))
    converted = convert_stage2(stage2, cfg)
    if _shapes(transformer) != {k: tuple(v.shape) for k, v in converted.items()}:  # a bug here, not in the file
        raise AssertionError("convert_stage2 does not produce DalleTransformer's state dict")

    text_tokenizer.save_pretrained(out / TEXT_TOKENIZER_DIR)
    save_component(out / IMAGE_TOKENIZER_DIR, image_config, stage1, dtype=dtype)
    save_component(out / TRANSFORMER_DIR, transformer_cfg, converted, dtype=dtype)
    atomic_write_bytes(out / PIPELINE_CONFIG_NAME,
                       (json.dumps(dataclasses.asdict(SAMPLING_DEFAULTS), indent=2) + "\n").encode())
    atomic_write_bytes(out / "README.md", (
        f"# minDALL-E, converted\n\nConverted by `dalle-proto convert mindalle` from kakaobrain's minDALL-E release "
        f"({files[CONFIG_FILE].parent}). Source: https://github.com/kakaobrain/minDALL-E. The stage-2 weights "
        "(transformer/) are licensed CC BY-NC-SA 4.0 by Kakao Brain (non-commercial use only).\n").encode())
    return out

