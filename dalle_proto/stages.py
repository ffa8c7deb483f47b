"""The training stages behind `dalle-proto train-text-tokenizer | train-image-tokenizer | encode | train |
train-clip`.

Each stage takes the run config and reads what earlier stages wrote under `out_dir`:

    out_dir/text_tokenizer/            tokenizer.json
    out_dir/image_tokenizer/           config.json + model.safetensors
    out_dir/image_tokenizer_training/  checkpoints, logs, reconstruction grids (resumable)
    out_dir/token_cache/{train,eval}/  image tokens (memory-mapped) + captions
    out_dir/transformer_training/      checkpoints, logs, sample grids (resumable)
    out_dir/transformer/               config.json + model.safetensors (EMA weights)
    out_dir/clip_training/             checkpoints, logs (resumable)
    out_dir/clip_training_member_{i}/  the same for ensemble member i >= 1 (clip_training.members)
    out_dir/clip/                      config.json + model.safetensors (the reranker; needs text_tokenizer/),
                                       or ensemble.json + member_{i}/ for an ensemble

Re-running a stage resumes it from its last checkpoint.

Fine-tuning a saved pipeline (`init_from=FOLDER`, e.g. what `dalle-proto convert mindalle` wrote):
`encode` copies FOLDER's text_tokenizer/, image_tokenizer/ (and pipeline.json) into out_dir and
encodes the data with that image tokenizer; `train` takes FOLDER's transformer config and starts from
its weights. The two tokenizer-training stages refuse to run, and an override of the transformer
section at `train` fails unless it equals the saved value: the saved parts are in force.

A dotted override must take effect or fail (`check_overrides`): an override of a value that a saved
part fixes (the text tokenizer's `bpe_dropout` at `train`, say) is an error naming the value in force
and its file, unless it equals that value; an override of a section the stage does not read at all
(`transformer.depth` given to `train-text-tokenizer`) is a warning that names the stages reading it, so
that one command line can still be passed to every stage.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from functools import reduce
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import IterableDataset, Subset
from tqdm.auto import tqdm

from .config import ConfigError, config_to_yaml
from .datasets import build_dataset
from .pretrained import atomic_write_bytes
from .run_config import RunConfig


# the top-level keys of the run config that each stage reads; the rest belongs to other stages
STAGE_READS = {
    "train_text_tokenizer": ("out_dir", "data", "text_tokenizer", "init_from"),
    "train_image_tokenizer": ("out_dir", "data", "image_tokenizer", "image_tokenizer_training",
                              "image_tokenizer_path", "init_from"),
    "encode": ("out_dir", "data", "image_tokenizer_path", "init_from"),
    "train": ("out_dir", "transformer", "training", "image_tokenizer_path", "init_from"),
    "train_clip": ("out_dir", "data", "clip", "clip_training"),
}


class UnusedOverrideWarning(UserWarning):
    """A command-line override names a part of the run config that this stage does not read."""


def check_overrides(stage: str, config: RunConfig, overrides: Sequence[str]) -> None:
    """Fail on an override that a saved part makes ineffective; warn on one the stage never reads."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        section = key.split(".", 1)[0]
        value = reduce(getattr, key.split("."), config)
        in_force = _value_in_force(stage, config, key)
        if in_force is not None:
            saved, source = in_force
            if saved != value:
                raise ConfigError(
                    f"override {item!r} has no effect on {stage.replace('_', '-')}: {key.split('.', 1)[1]}="
                    f"{saved!r} is in force, from {source}; to change it, re-run the stage that wrote that "
                    "file with this override (and the stages after it)")
        elif section not in STAGE_READS[stage]:
            readers = [name.replace("_", "-") for name, reads in STAGE_READS.items() if section in reads]
            warnings.warn(f"override {item!r} is not used by {stage.replace('_', '-')} (it reads "
                          f"{', '.join(STAGE_READS[stage])}); it takes effect in: {', '.join(readers) or 'none'}",
                          UnusedOverrideWarning, stacklevel=2)


def _value_in_force(stage: str, config: RunConfig, key: str) -> tuple[Any, str] | None:
    """(value, file) when a part saved by an earlier stage fixes `key` for this stage, else None."""
    section, _, name = key.partition(".")
    if section == "text_tokenizer" and stage in ("train", "train_clip") and name:
        saved = _saved_text_tokenizer(config)
        if saved is None:
            return None  # the stage itself says the tokenizer is missing
        tokenizer, source = saved
        if name == "vocab_size":  # the file holds the true size; compare what training asked for
            return (tokenizer.requested_vocab_size, source) if tokenizer.requested_vocab_size is not None else None
        return getattr(tokenizer.config, name), source
    if section == "image_tokenizer" and stage in ("encode", "train") and name:
        from .pretrained import CONFIG_NAME, read_json_object

        path = image_tokenizer_folder(config) / CONFIG_NAME
        if not path.is_file():
            return None
        values = read_json_object(path, f"the {CONFIG_NAME} written by ImageTokenizer.save_pretrained")
        top = name.split(".")[0]
        return (values[top], str(path)) if top in values else None
    if section == "transformer" and stage == "train" and name and config.init_from:
        path = Path(config.init_from) / "transformer" / "config.json"
        saved = _read_saved_config(path)
        return (saved.get(name.split(".")[0], f"(no {name} in {path.name}: the saved architecture)"), str(path))
    derived = {"text_vocab_size", "text_len", "image_vocab_size", "image_grid"}
    if section == "transformer" and stage == "train" and name in derived:
        return _derived_transformer_value(config, name)
    return None


def _read_saved_config(path: Path) -> dict[str, Any]:
    from .pretrained import CONFIG_NAME, read_json_object

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected the {CONFIG_NAME} that save_pretrained writes")
    return read_json_object(path, f"the {CONFIG_NAME} written by save_pretrained")


# ---- init_from: fine-tune a saved pipeline ---------------------------------------------------------
_PARTS_COPIED = ("text_tokenizer", "image_tokenizer")


def init_from_folder(config: RunConfig) -> Path | None:
    """config.init_from as a checked pipeline folder (None when unset)."""
    if config.init_from is None:
        return None
    folder = Path(config.init_from)
    missing = [f"{p}/" for p in (*_PARTS_COPIED, "transformer") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"init_from={config.init_from}: not a pipeline folder ({', '.join(missing)} "
                                "missing); expected what save_pretrained, export or `convert mindalle` writes")
    if config.image_tokenizer_path:
        raise ValueError(f"init_from={config.init_from} and image_tokenizer_path={config.image_tokenizer_path} "
                         "are both set; init_from brings its own image tokenizer: unset one of them")
    return folder


def _refuse_with_init_from(config: RunConfig, part: str) -> None:
    if config.init_from is not None:
        raise ValueError(f"init_from={config.init_from} is set, so this run uses its {part} (encode copies it "
                         f"into {config.out}); unset init_from to train a new one")


def _copy_saved_parts(source: Path, out: Path) -> None:
    """source's tokenizers (and pipeline.json) into out, atomically per part; parts already there
    must be byte-identical, so a run never mixes two models' tokenizers."""
    import filecmp
    import shutil
    import tempfile

    for part in _PARTS_COPIED:
        target = out / part
        if target.exists():
            cmp = filecmp.dircmp(source / part, target)
            if cmp.left_only or cmp.right_only or filecmp.cmpfiles(source / part, target, cmp.common_files,
                                                                    shallow=False)[1:] != ([], []):
                raise ValueError(f"{target} exists and differs from {source / part}; this run was started "
                                 "from other parts: use a new out_dir")
            continue
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{part}."))
        shutil.copytree(source / part, tmp, dirs_exist_ok=True)
        os.replace(tmp, target)
        print(f"{source / part} -> {target}")
    if (source / "pipeline.json").is_file() and not (out / "pipeline.json").exists():
        atomic_write_bytes(out / "pipeline.json", (source / "pipeline.json").read_bytes())


def _saved_text_tokenizer(config: RunConfig):
    """(the run's saved TextTokenizer, its file) or None when train-text-tokenizer has not run."""
    from .text_tokenizer import TOKENIZER_FILE, TextTokenizer

    folder = config.out / "text_tokenizer"
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    return TextTokenizer.from_pretrained(folder), str(folder / TOKENIZER_FILE)


def _derived_transformer_value(config: RunConfig, name: str) -> tuple[Any, str] | None:
    """transformer.text_len and its kin come from the tokenizer and the token cache, not the config."""
    if name in ("text_vocab_size", "text_len"):
        saved = _saved_text_tokenizer(config)
        if saved is None:
            return None
        tokenizer, source = saved
        return getattr(tokenizer, "vocab_size" if name == "text_vocab_size" else name), source
    from .token_cache import TokenCache

    folder = config.out / "token_cache" / "train"
    if not (folder / "meta.json").is_file():
        return None
    cache = TokenCache(folder)
    return (cache.codebook_size if name == "image_vocab_size" else cache.grid_size), str(folder / "meta.json")


def _has_eval_split(config: RunConfig) -> bool:
    return config.data.kind == "shapes"


def _save_run_config(config: RunConfig, stage: str) -> None:
    atomic_write_bytes(config.out / f"{stage}.config.yaml", config_to_yaml(config).encode())


def _captions(dataset) -> list[str]:
    if isinstance(dataset, IterableDataset):
        return [caption for _, caption in tqdm(dataset, desc="reading captions", unit="item")]
    return [c for i in tqdm(range(len(dataset)), desc="reading captions", unit="item")
            for c in dataset.captions(i)]


def _train_eval_datasets(config: RunConfig):
    """The train and eval data sets; without an eval split, the last `eval_count` items are held out."""
    train = build_dataset(config.data, "train")
    if _has_eval_split(config):
        return train, build_dataset(config.data, "eval")
    if isinstance(train, IterableDataset):
        raise ValueError(f"data.kind={config.data.kind!r} streams its items; write it to a folder "
                         "first to train the image tokenizer, which needs a held-out eval set")
    n_eval = min(config.data.eval_count, max(1, len(train) // 10))
    return Subset(train, range(len(train) - n_eval)), Subset(train, range(len(train) - n_eval, len(train)))


def image_tokenizer_folder(config: RunConfig) -> Path:
    return Path(config.image_tokenizer_path) if config.image_tokenizer_path else config.out / "image_tokenizer"


def train_text_tokenizer(config: RunConfig):
    from .text_tokenizer import train_text_tokenizer as train

    _refuse_with_init_from(config, "text tokenizer")
    _save_run_config(config, "train_text_tokenizer")
    captions = _captions(build_dataset(config.data, "train"))
    tokenizer = train(captions, config.text_tokenizer, config.out / "text_tokenizer")
    print(f"text tokenizer: {tokenizer.vocab_size} BPE ids + {tokenizer.text_len} pads, trained on "
          f"{len(captions)} captions -> {config.out / 'text_tokenizer'}")
    return tokenizer


def train_image_tokenizer(config: RunConfig):
    from .image_tokenizer_training import train_image_tokenizer as train

    if config.image_tokenizer_path:
        raise ValueError(f"image_tokenizer_path={config.image_tokenizer_path!r} is set, so this run uses "
                         "that saved image tokenizer; unset it to train one")
    _refuse_with_init_from(config, "image tokenizer")
    _save_run_config(config, "train_image_tokenizer")
    train_set, eval_set = _train_eval_datasets(config)
    model = train(config.image_tokenizer, config.image_tokenizer_training, train_set, eval_set,
                  config.out / "image_tokenizer_training")
    model.save_pretrained(config.out / "image_tokenizer")
    print(f"image tokenizer -> {config.out / 'image_tokenizer'}")
    return model


def _data_record(config: RunConfig, split: str) -> dict:
    """What a split's token cache depends on in `config.data` (eval ignores shapes_mix)."""
    record = dataclasses.asdict(config.data)
    record.pop("strict")  # skipping or raising on bad items does not change what is encoded
    if split == "eval":
        record["shapes_mix"] = None
    return record


def check_cache_data(config: RunConfig, cache) -> None:
    """A cache encoded from other data settings than the run config's would make them ineffective."""
    recorded = cache.data
    if recorded is None:  # written before meta.json recorded the data
        return
    current = _data_record(config, cache.folder.name)
    differ = [f"data.{k}={recorded.get(k)!r} (config: {v!r})" for k, v in current.items() if recorded.get(k) != v]
    if differ:
        raise ValueError(f"token cache {cache.folder} was encoded with {', '.join(differ)}; delete the "
                         f"folder and run `dalle-proto encode` again, or restore those settings")


def encode(config: RunConfig) -> list[Path]:
    from .image_tokenizer import ImageTokenizer
    from .token_cache import TokenCache, encode_to_cache

    source = init_from_folder(config)
    if source is not None:
        _copy_saved_parts(source, config.out)
    image_tokenizer = ImageTokenizer.from_pretrained(image_tokenizer_folder(config))
    if image_tokenizer.config.resolution != config.data.image_size:
        raise ValueError(f"the image tokenizer in {image_tokenizer_folder(config)} was built for "
                         f"{image_tokenizer.config.resolution} px images, but data.image_size is "
                         f"{config.data.image_size}")
    splits = ["train", "eval"] if _has_eval_split(config) else ["train"]
    written = []
    for split in splits:
        out = config.out / "token_cache" / split
        if (out / "meta.json").is_file():
            check_cache_data(config, TokenCache(out))
            print(f"token cache {out} exists; delete it to encode again")
        else:
            encode_to_cache(image_tokenizer, build_dataset(config.data, split), out,
                            data=_data_record(config, split))
        written.append(out)
    return written


def train(config: RunConfig, callbacks: Sequence[Any] = ()):
    """Train the transformer on the run's token cache; `callbacks`: extra Lightning callbacks."""
    from .image_tokenizer import ImageTokenizer
    from .text_tokenizer import TextTokenizer
    from .token_cache import TokenCache
    from .transformer_training import train_transformer

    if config.training.converse_relations > 0 and config.data.kind != "shapes":
        raise ConfigError(f"training.converse_relations={config.training.converse_relations} restates shapes pair "
                          f"captions and has no effect on data.kind={config.data.kind!r}; set it to 0")
    source = init_from_folder(config)
    saved = _saved_transformer(config, source) if source is not None else None  # checked before any loading
    text_tokenizer = TextTokenizer.from_pretrained(config.out / "text_tokenizer")
    train_cache = TokenCache(config.out / "token_cache" / "train", seed=config.training.seed)
    eval_folder = config.out / "token_cache" / "eval"
    val_cache = TokenCache(eval_folder, seed=config.training.seed) if eval_folder.is_dir() else None
    for cache in (train_cache, val_cache) if val_cache is not None else (train_cache,):
        check_cache_data(config, cache)
    if saved is None:
        transformer_config = config.transformer.to_transformer_config(
            text_vocab_size=text_tokenizer.vocab_size, text_len=text_tokenizer.text_len,
            image_vocab_size=train_cache.codebook_size, image_grid=train_cache.grid_size)
    else:  # the saved architecture, and its weights through training.init_from
        transformer_config, weights = saved
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, init_from=weights))
    _save_run_config(config, "train")
    image_tokenizer = ImageTokenizer.from_pretrained(image_tokenizer_folder(config))
    model = train_transformer(transformer_config, config.training, text_tokenizer, train_cache, val_cache,
                              config.out / "transformer_training", image_tokenizer=image_tokenizer,
                              callbacks=list(callbacks))
    if rank_zero_only.rank == 0:  # under DDP every rank holds the same weights: one writes them
        model.save_pretrained(config.out / "transformer")
        print(f"transformer -> {config.out / 'transformer'}")
    return model


def _saved_transformer(config: RunConfig, source: Path):
    """(TransformerConfig, weights folder) of init_from's transformer; a transformer setting of the
    run config that differs from the saved one is an error (it would have no effect)."""
    from .pretrained import config_from_dict
    from .transformer import TransformerConfig

    path = source / "transformer" / "config.json"
    saved = _read_saved_config(path)
    default = type(config.transformer)()
    ignored = [f"transformer.{f.name}={getattr(config.transformer, f.name)!r}"
               for f in dataclasses.fields(config.transformer)
               if getattr(config.transformer, f.name) != getattr(default, f.name)
               and getattr(config.transformer, f.name) != saved.get(f.name)]
    if ignored:  # from a YAML transformer section (command-line overrides fail in check_overrides)
        raise ValueError(f"init_from={config.init_from} fixes the transformer ({path}), but this run config "
                         f"sets {', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''}; drop the "
                         "transformer section from the YAML")
    weights = str(source / "transformer")
    if config.training.init_from not in (None, weights, str(source)):
        raise ValueError(f"init_from={config.init_from} and training.init_from={config.training.init_from} "
                         "name different weights; set one of them")
    return config_from_dict(TransformerConfig, saved, source=str(path)), weights


def train_clip(config: RunConfig):
    from .clip import ClipConfig, ClipEnsemble
    from .clip_training import train_clip as train
    from .text_tokenizer import TextTokenizer

    text_tokenizer = TextTokenizer.from_pretrained(config.out / "text_tokenizer")
    clip_config = ClipConfig.from_architecture(config.clip, text_vocab_size=text_tokenizer.total_vocab_size,
                                               text_len=text_tokenizer.text_len, image_size=config.data.image_size)
    _save_run_config(config, "train_clip")
    dataset, c = build_dataset(config.data, "train"), config.clip_training
    members = []
    for i in range(c.members):  # one after another, each resumable in its own folder
        folder = config.out / ("clip_training" if i == 0 else f"clip_training_member_{i}")
        if c.members > 1:
            print(f"CLIP ensemble member {i} of 0..{c.members - 1} (seed {c.seed + i}) -> {folder}")
        members.append(train(clip_config, dataclasses.replace(c, seed=c.seed + i), text_tokenizer, dataset, folder))
    model = members[0] if len(members) == 1 else ClipEnsemble(members)
    model.save_pretrained(config.out / "clip")
    print(f"clip -> {config.out / 'clip'}")
    return model
