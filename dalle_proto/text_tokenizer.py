"""The text tokenizer: caption -> fixed-length text ids, the DALL·E way.

Byte-level BPE (HF `tokenizers`) over the normalised caption (NFKC, lower case, runs of whitespace
collapsed to one space, stripped). Byte-level means the base alphabet is the 256 bytes, so no
caption is ever unknown: an unseen word or emoji just costs more tokens. Every word carries its
leading space marker (`add_prefix_space`), so "red" is the same token at the start of a caption and
in its middle, which matters when the vocabulary is small.

BPE dropout (the paper's 0.1; Provilkov et al. 2020) is applied only in training mode, switched like
an `nn.Module`: `tok.train()` / `tok.eval()` and the `tok.training` flag; a new or loaded tokenizer is
in eval mode. In eval mode the `tokenizers` library encodes. In training mode the same vocabulary and
merges are applied here (`bpe_dropout.py`), each merge skipped with probability bpe_dropout by a
numpy generator the caller passes (`encode(captions, rng=...)`), because the library draws its dropout
from an unseedable thread RNG: a training run seeds one generator per sample, so its text ids (and the
run) are bit-reproducible and resume exactly.

Fixed length: a caption is truncated to `text_len` ids (with a warning that says so); position i of a shorter caption gets the pad
id `vocab_size + i` (the paper's per-position pad: each position learns its own pad embedding), so
the transformer's text vocabulary is `total_vocab_size = vocab_size + text_len`. The empty caption
is all pads: the "null" text of classifier-free guidance (`null_ids()`).

`vocab_size` is the size of the vocabulary the trainer actually produced, which on a small corpus is
far below the requested size; BPE ids are exactly 0..vocab_size-1, so pads never collide with them.

Saved as ONE `tokenizer.json`, the standard `tokenizers` file, whose standard fields hold the
dalle_proto settings (`tokenizer_json.py`).

kind="char_bpe" is minDALL-E's tokenizer instead (`from_char_bpe`: a CharBPE vocabulary read from
vocab.json + merges.txt, as `tokenizers.CharBPETokenizer` builds it: BERT normaliser, lower case,
BERT pre-tokenizer, `</w>` word suffix, `[UNK]`), with ONE pad: the `[PAD]` token, which sits inside
the vocabulary and fills every position after the caption. Then `total_vocab_size == vocab_size`,
`pad_id` is [PAD]'s id and the null text is text_len [PAD]s. It is loaded, never trained here, and
has no BPE dropout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_proto.bpe_dropout import BpeMerges
from dalle_proto.pretrained import BadSavedFileError, atomic_write_bytes, read_text_file
from dalle_proto.tokenizer_json import CHAR_BPE_PAD, RECORD_KEY, check_ids_contiguous, settings_from_json

TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256  # byte-level BPE always holds the 256 byte symbols
KINDS = ("byte_level", "char_bpe")
CHAR_BPE_UNK, CHAR_BPE_SUFFIX = "[UNK]", "</w>"  # minDALL-E's tokenizer


class TruncationWarning(UserWarning):
    """A caption had more text tokens than text_len and lost its end."""


class TruncationReportedOnce:
    """For a data pipeline, which meets the same long captions at every step: `with report():` around
    its encoding passes the first TruncationWarning on, saying that later ones are not reported, and
    drops the later ones; other warnings pass through."""

    def __init__(self, where: str) -> None:
        self.where, self.reported = where, False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            yield
        for w in caught:
            if not issubclass(w.category, TruncationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif not self.reported:
                self.reported = True
                warnings.warn(f"{w.message}; later truncations in {self.where} are not reported",
                              TruncationWarning, stacklevel=3)


@dataclass
class TextTokenizerConfig:
    vocab_size: int = 16384  # requested BPE vocabulary (the paper's); after training: the true size
    text_len: int = 256  # ids per caption, after truncation / per-position padding
    bpe_dropout: float = 0.1  # probability of skipping each BPE merge, training mode only
    lowercase: bool = True  # the paper tokenises the lower-cased caption
    min_frequency: int = 2  # a merge must occur this often in the corpus (training only)
    # "byte_level": ours (byte-level BPE, one pad id per position); "char_bpe": minDALL-E's CharBPE
    # vocabulary padded with its one [PAD] token (`TextTokenizer.from_char_bpe`; not trainable here)
    kind: str = "byte_level"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TextTokenizerConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "char_bpe" and self.bpe_dropout != 0:
            raise ValueError(f"TextTokenizerConfig.bpe_dropout={self.bpe_dropout}: kind='char_bpe' (minDALL-E's "
                             "tokenizer) has no BPE dropout here; set bpe_dropout=0")
        if self.kind == "byte_level" and self.vocab_size < BYTE_ALPHABET_SIZE:
            raise ValueError(f"TextTokenizerConfig.vocab_size={self.vocab_size}: byte-level BPE needs at "
                             f"least the {BYTE_ALPHABET_SIZE} byte symbols")
        if self.text_len < 1:
            raise ValueError(f"TextTokenizerConfig.text_len={self.text_len}: expected >= 1")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ValueError(f"TextTokenizerConfig.bpe_dropout={self.bpe_dropout}: expected 0 <= p < 1")
        if self.min_frequency < 1:
            raise ValueError(f"TextTokenizerConfig.min_frequency={self.min_frequency}: expected >= 1")


class TextTokenizer:
    """Caption(s) -> LongTensor of text ids, (text_len,) or (B, text_len); and back."""

    def __init__(self, tokenizer: Tokenizer, config: TextTokenizerConfig,
                 requested_vocab_size: int | None = None) -> None:
        # Use `from_captions` or `from_pretrained`; this trusts that `config` describes `tokenizer`.
        self._tokenizer = tokenizer
        self.config = config
        self.requested_vocab_size = requested_vocab_size  # what training asked for (None: unknown)
        self.pad_id: int | None = None  # char_bpe: the id of its one [PAD]; byte_level: None (pads per position)
        if config.kind == "char_bpe":
            self.pad_id = tokenizer.token_to_id(CHAR_BPE_PAD)
            if self.pad_id is None:
                raise ValueError(f"a char_bpe text tokenizer needs the {CHAR_BPE_PAD} token in its vocabulary")
            self._pad_ids = [self.pad_id] * config.text_len
        else:
            self._pad_ids = list(range(config.vocab_size, config.vocab_size + config.text_len))
        self.training = False
        self._tokenizer.model.dropout = None  # the library never drops merges: BpeMerges does, seeded
        self._merges: BpeMerges | None = None  # built on the first encode with dropout

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of BPE ids (0..vocab_size-1); per-position pads start here (char_bpe: its [PAD] is
        one of them)."""
        return self.config.vocab_size

    @property
    def text_len(self) -> int:
        return self.config.text_len

    @property
    def total_vocab_size(self) -> int:
        """BPE ids plus one pad per position (char_bpe: the BPE ids, [PAD] among them): the size of
        the transformer's text embedding."""
        if self.pad_id is not None:
            return self.config.vocab_size
        return self.config.vocab_size + self.config.text_len

    # ---- mode --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "TextTokenizer":
        """Training mode: BPE dropout on (if config.bpe_dropout > 0). Returns self, like nn.Module."""
        self.training = bool(mode)
        return self

    def eval(self) -> "TextTokenizer":
        """Eval mode: deterministic BPE. Returns self."""
        return self.train(False)

    # ---- encoding ----------------------------------------------------------------------------
    def normalize(self, caption: str) -> str:
        """The text the BPE actually sees (and what `decode` gives back)."""
        return self._tokenizer.normalizer.normalize_str(_check_caption(caption, 0))

    def encode_ids(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """BPE ids of one caption, truncated to text_len, without pads (`rng`: as in `encode`)."""
        return self._encode_all([_check_caption(caption, 0)], _rngs(rng, 1))[0]

    def encode(self, captions: str | Sequence[str],
               rng: np.random.Generator | Sequence[np.random.Generator] | None = None) -> torch.Tensor:
        """A caption -> (text_len,) LongTensor; a list of B captions -> (B, text_len).

        rng: where BPE dropout draws (training mode with bpe_dropout > 0 only; ignored otherwise): one
        generator shared by all captions in order, or one per caption (what a training run passes, so
        that a caption's ids do not depend on the rest of its batch). None draws from a fresh unseeded
        generator, so successive calls differ and are not reproducible."""
        if isinstance(captions, str):
            return self._pad(self.encode_ids(captions, rng))  # (T,)
        captions = [_check_caption(c, i) for i, c in enumerate(captions)]
        rows = [ids + self._pad_ids[len(ids):] for ids in self._encode_all(captions, _rngs(rng, len(captions)))]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.text_len)  # (B, T)

    def _encode_all(self, captions: list[str], rngs: list[np.random.Generator | None]) -> list[list[int]]:
        """BPE ids per caption, truncated to text_len. BPE dropout splits words into more ids; where
        that pushes a caption past text_len, its deterministic ids are used instead: cutting words
        off the end would teach the model that the end of a caption (a position, the second object)
        does not matter."""
        encodings = self._tokenizer.encode_batch(captions) if captions else []
        ids = [enc.ids for enc in encodings]
        self._warn_truncated(captions, encodings)
        p = self.config.bpe_dropout
        if self.training and p > 0:
            fresh = np.random.default_rng() if None in rngs else None  # the caller passed no generator
            for i, caption in enumerate(captions):
                dropped = self.dropout_ids(caption, rngs[i] or fresh)
                if len(dropped) <= self.text_len:
                    ids[i] = dropped
        return ids

    def dropout_ids(self, caption: str, rng: np.random.Generator, p: float | None = None) -> list[int]:
        """BPE ids of one caption with each merge skipped with probability p (default: bpe_dropout),
        drawn from `rng`, NOT truncated to text_len (`benchmarks/caption_pieces.py` counts how often a
        training caption would pass it); whatever the mode."""
        if self._merges is None:
            self._merges = BpeMerges.from_tokenizer_json(json.loads(self._tokenizer.to_str()))
        pieces = self._tokenizer.pre_tokenizer.pre_tokenize_str(self._tokenizer.normalizer.normalize_str(caption))
        return self._merges.encode([piece for piece, _ in pieces], self.config.bpe_dropout if p is None else p, rng)

    def _warn_truncated(self, captions: list[str], encodings: list) -> None:
        long = [(i, len(e.ids) + sum(len(o.ids) for o in e.overflowing))
                for i, e in enumerate(encodings) if e.overflowing]
        if long:
            i, n = long[0]
            more = f" ({len(long) - 1} more in this batch)" if len(long) > 1 else ""
            warnings.warn(f"caption {i} {captions[i][:60]!r}{'...' if len(captions[i]) > 60 else ''} has {n} "
                          f"text tokens, more than text_len={self.text_len}: truncated to the first "
                          f"{self.text_len}{more}", TruncationWarning, stacklevel=4)

    def null_ids(self) -> torch.Tensor:
        """The empty caption: all per-position pads, (text_len,). The unconditional text for CFG."""
        return torch.tensor(self._pad_ids, dtype=torch.long)  # (T,)

    def _pad(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids + self._pad_ids[len(ids):], dtype=torch.long)  # (T,)

    # ---- decoding ----------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """(T,) ids -> str; (B, T) ids -> list of B str. Pad ids (>= vocab_size) are dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() not in (1, 2):
                raise ValueError(f"decode: expected ids of shape (T,) or (B, T), got {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        if ids and not isinstance(ids[0], int):  # a batch
            return [self._decode_one(list(row)) for row in ids]
        return self._decode_one(ids)

    def _decode_one(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.total_vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} out of range; expected 0 <= id < total_vocab_size="
                             f"{self.total_vocab_size} (BPE ids < {self.vocab_size}, pads above)")
        kept = [i for i in ids if i < self.vocab_size and i != self.pad_id]
        text = self._tokenizer.decode(kept, skip_special_tokens=False)
        return text.strip()  # every word carries a leading space marker, the first one included

    # ---- training ----------------------------------------------------------------------------
    @classmethod
    def from_captions(cls, captions: Iterable[str], config: TextTokenizerConfig,
                      progress: bool = False) -> "TextTokenizer":
        """Train byte-level BPE on `captions`. The result's config.vocab_size is the TRUE vocab size.

        (Named `from_captions`, not `train`, because `train()` switches training mode as in nn.Module.)
        """
        if config.kind != "byte_level":
            raise ValueError(f"TextTokenizer.from_captions trains byte-level BPE only; a kind={config.kind!r} "
                             "tokenizer is loaded with TextTokenizer.from_char_bpe(vocab.json, merges.txt)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = _normalizer(config.lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],  # pads are ours, outside the BPE vocabulary
            show_progress=progress,
        )
        counter = _Counter(captions)
        tokenizer.train_from_iterator(counter, trainer=trainer)
        if counter.n == 0:
            raise ValueError("TextTokenizer.from_captions: got no captions to train on")
        tokenizer.enable_truncation(max_length=config.text_len)
        true_size = tokenizer.get_vocab_size(with_added_tokens=True)
        return cls(tokenizer, dataclasses.replace(config, vocab_size=true_size), requested_vocab_size=config.vocab_size)

    @classmethod
    def from_char_bpe(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                      text_len: int = 64, lowercase: bool = True) -> "TextTokenizer":
        """minDALL-E's tokenizer from its CharBPE files (bpe-16k-vocab.json, bpe-16k-merges.txt):
        the tokenizer `CharBPETokenizer.from_file(vocab, merges, unk_token="[UNK]",
        lowercase=lowercase)` builds, plus the special token [PAD] (appended unless the vocabulary
        has it), truncated to text_len and padded with [PAD]. Ids equal minDALL-E's."""
        for path in (vocab_json, merges_txt):
            if not Path(path).is_file():
                raise BadSavedFileError(path, "missing; expected a CharBPE vocab.json and merges.txt pair")
        try:
            model = models.BPE.from_file(str(vocab_json), str(merges_txt), unk_token=CHAR_BPE_UNK,
                                         end_of_word_suffix=CHAR_BPE_SUFFIX)
        except Exception as e:  # the tokenizers parser's error names neither file
            raise BadSavedFileError(vocab_json, f"with {merges_txt}: not a CharBPE vocab.json + merges.txt pair "
                                                f"({e})") from e
        tokenizer = Tokenizer(model)
        if tokenizer.token_to_id(CHAR_BPE_UNK) is not None:  # as CharBPETokenizer does
            tokenizer.add_special_tokens([CHAR_BPE_UNK])
        steps = [normalizers.BertNormalizer(lowercase=False)] + ([normalizers.Lowercase()] if lowercase else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.BPEDecoder(suffix=CHAR_BPE_SUFFIX)
        tokenizer.add_special_tokens([CHAR_BPE_PAD])
        tokenizer.enable_truncation(max_length=text_len)
        config = TextTokenizerConfig(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), text_len=text_len,
                                     bpe_dropout=0.0, lowercase=lowercase, kind="char_bpe")
        check_ids_contiguous(tokenizer, str(vocab_json))
        return cls(tokenizer, config)

    # ---- saving / loading --------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `folder/tokenizer.json` atomically (`tokenizer_json.py` says what it holds)."""
        data = json.loads(self._tokenizer.to_str())
        data["model"]["dropout"] = self.config.bpe_dropout or None  # recorded whatever the mode
        record = {"min_frequency": self.config.min_frequency}
        if self.requested_vocab_size is not None:
            record["requested_vocab_size"] = self.requested_vocab_size
        data["model"][RECORD_KEY] = record
        path = Path(folder) / TOKENIZER_FILE
        atomic_write_bytes(path, (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "TextTokenizer":
        """Load what `save_pretrained` wrote; returns a tokenizer in eval mode."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no text tokenizer here; expected the {TOKENIZER_FILE} "
                                    f"written by TextTokenizer.save_pretrained / train_text_tokenizer")
        expected = f"the {TOKENIZER_FILE} written by TextTokenizer.save_pretrained"
        text = read_text_file(path, expected)
        try:
            data = json.loads(text)
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # json.JSONDecodeError or the tokenizers parser's error
            raise BadSavedFileError(path, f"not a valid tokenizers JSON file ({e}); expected {expected}") from e
        if not isinstance(data.get("model"), dict):
            raise BadSavedFileError(path, f"has no BPE `model` object; expected {expected}")
        requested = ((data.get("model") or {}).get(RECORD_KEY) or {}).get("requested_vocab_size")
        settings = settings_from_json(data, tokenizer, str(path))
        if settings["min_frequency"] is None:  # a tokenizer.json without our record
            settings["min_frequency"] = TextTokenizerConfig.min_frequency
        return cls(tokenizer, TextTokenizerConfig(**settings),
                   requested_vocab_size=requested if isinstance(requested, int) else None)

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, text_len={self.text_len}, "
                f"bpe_dropout={self.config.bpe_dropout}, training={self.training})")


def train_text_tokenizer(captions: Iterable[str], config: TextTokenizerConfig,
                         out_dir: str | os.PathLike, progress: bool = True) -> TextTokenizer:
    """Train on `captions`, save `out_dir/tokenizer.json`, return the tokenizer (eval mode)."""
    text_tokenizer = TextTokenizer.from_captions(captions, config, progress=progress)
    text_tokenizer.save_pretrained(out_dir)
    return text_tokenizer


# ---- helpers ---------------------------------------------------------------------------------
def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


def _rngs(rng: np.random.Generator | Sequence[np.random.Generator] | None,
          n: int) -> list[np.random.Generator | None]:
    """One generator per caption: a shared one repeated, the caller's list checked, or None (a fresh
    generator is made only if dropout draws, see `_encode_all`)."""
    if rng is None or isinstance(rng, np.random.Generator):
        return [rng] * n
    rngs = list(rng)
    if len(rngs) != n or not all(isinstance(r, np.random.Generator) for r in rngs):
        raise ValueError(f"rng: expected a numpy Generator or a list of {n} (one per caption), got "
                         f"{len(rngs)} item(s) of type(s) {sorted({type(r).__name__ for r in rngs})}")
    return rngs


def _check_caption(caption: Any, index: int) -> str:
    if not isinstance(caption, str):
        raise TypeError(f"caption {index}: expected str, got {type(caption).__name__}: {caption!r:.80}")
    return caption


class _Counter:
    """Iterates over captions, type-checking each and counting them (the trainer streams them)."""

    def __init__(self, captions: Iterable[str]) -> None:
        self.captions = captions
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        for caption in self.captions:
            yield _check_caption(caption, self.n)
            self.n += 1
