"""How a TextTokenizer's settings live in one standard `tokenizers` file, tokenizer.json (loadable
by `Tokenizer.from_file`). They are read back from its standard fields, so they cannot disagree
with it:
  vocab_size  <- the size of `model.vocab`
  text_len    <- `truncation.max_length`
  bpe_dropout <- `model.dropout` (note: a raw `Tokenizer.from_file` therefore has dropout ON)
  lowercase   <- whether `normalizer` contains `Lowercase`
  kind        <- the pre-tokenizer: `ByteLevel` is "byte_level", `BertPreTokenizer` is "char_bpe"
The training-only knobs `min_frequency` and the requested vocabulary size are kept for the record
under `model.dalle_proto` (the `tokenizers` loader ignores unknown keys inside `model`; a missing
record falls back to the default), so a later stage can tell whether a config value is the one the
saved tokenizer was trained with.
"""
from __future__ import annotations

from tokenizers import Tokenizer

RECORD_KEY = "dalle_proto"  # our record inside tokenizer.json's `model` object
CHAR_BPE_PAD = "[PAD]"  # minDALL-E's one pad token


def settings_from_json(data: dict, tokenizer: Tokenizer, source: str) -> dict:
    """TextTokenizerConfig's fields from tokenizer.json's standard fields (see the module docstring);
    min_frequency is None where the file has no dalle_proto record."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: expected a BPE model, got model.type={model.get('type')!r}")
    kind = "byte_level" if (data.get("pre_tokenizer") or {}).get("type") == "ByteLevel" else "char_bpe"
    added = [t.get("content") for t in data.get("added_tokens") or []]
    if kind == "byte_level" and added:
        raise ValueError(f"{source}: has added_tokens {added[:5]}; a byte-level dalle_proto text tokenizer "
                         "has none (its pads live outside the BPE vocabulary)")
    if kind == "char_bpe" and CHAR_BPE_PAD not in added:
        raise ValueError(f"{source}: a char_bpe tokenizer (pre-tokenizer "
                         f"{(data.get('pre_tokenizer') or {}).get('type')!r}) needs the {CHAR_BPE_PAD} added token; "
                         f"found added_tokens {added[:5]}")
    vocab = check_ids_contiguous(tokenizer, source)
    truncation = data.get("truncation") or {}
    if not isinstance(truncation.get("max_length"), int):
        raise ValueError(f"{source}: missing truncation.max_length, which holds dalle_proto's text_len")
    if data.get("padding") is not None:
        raise ValueError(f"{source}: has tokenizers padding set; dalle_proto pads per position itself")
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    record = model.get(RECORD_KEY) or {}
    return dict(
        vocab_size=len(vocab),
        text_len=truncation["max_length"],
        bpe_dropout=float(model.get("dropout") or 0.0),
        lowercase=any(step.get("type") == "Lowercase" for step in steps),
        min_frequency=int(record["min_frequency"]) if "min_frequency" in record else None,
        kind=kind,
    )


def check_ids_contiguous(tokenizer: Tokenizer, source: str) -> dict[str, int]:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{source}: BPE ids are not exactly 0..{len(vocab) - 1}; pads would collide")
    return vocab
