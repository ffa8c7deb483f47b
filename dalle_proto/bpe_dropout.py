"""BPE dropout that draws from a generator you seed: the merges of a `tokenizers` BPE model, applied
here with each merge skipped with probability p (Provilkov et al. 2020, "BPE-Dropout").

The `tokenizers` library implements the same algorithm but draws from its own thread RNG, which
cannot be seeded, so a training run with dropout on could be neither repeated nor resumed exactly.
`BpeMerges` reads the vocabulary and merge ranks out of the library's `tokenizer.json` unchanged and
applies them to the library's own pre-tokenised pieces, so with p = 0 its ids equal the library's
(tested), and with p > 0 a caption's ids are a function of its generator's state alone.

The algorithm, per word: list the adjacent symbol pairs that have a merge; drop each with probability
p; apply the best-ranked survivor (the leftmost on a tie); repeat until no pair survives. The library
does the same with a priority queue: popping in rank order and skipping each with probability p picks
the best-ranked survivor of independent drops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BpeMerges:
    vocab: dict[str, int]  # symbol -> id
    ranks: dict[tuple[str, str], int]  # (left, right) -> merge rank, 0 applied first

    @classmethod
    def from_tokenizer_json(cls, data: dict, source: str = "tokenizer.json") -> "BpeMerges":
        """From a parsed `tokenizers` JSON file (`json.loads(tokenizer.to_str())`) of a BPE model."""
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{source}: BPE dropout needs a BPE model, got model.type={model.get('type')!r}")
        unsupported = {key: model.get(key) for key in ("continuing_subword_prefix", "end_of_word_suffix")
                       if model.get(key)}
        unsupported.update({key: True for key in ("byte_fallback", "ignore_merges") if model.get(key)})
        if unsupported:
            raise ValueError(f"{source}: BPE dropout supports plain byte-level BPE models; this one sets "
                             f"{unsupported}")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return cls(vocab=dict(model.get("vocab") or {}), ranks={pair: rank for rank, pair in enumerate(merges)})

    def encode(self, pieces: list[str], p: float, rng: np.random.Generator) -> list[int]:
        """Ids of pre-tokenised `pieces` (the pre-tokenizer's output, byte-level symbols), every merge
        dropped with probability p, drawing from `rng`."""
        ids: list[int] = []
        for piece in pieces:
            ids.extend(self.vocab[symbol] for symbol in self.merge_word(piece, p, rng))
        return ids

    def merge_word(self, word: str, p: float, rng: np.random.Generator) -> list[str]:
        symbols = list(word)
        missing = [s for s in symbols if s not in self.vocab]
        if missing:
            raise ValueError(f"BPE dropout: symbols {missing[:5]} of {word!r} are not in the vocabulary")
        ranks = self.ranks
        while len(symbols) > 1:
            candidates = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
            if not candidates:
                break
            if p > 0:
                kept = rng.random(len(candidates)) >= p
                candidates = [c for c, keep in zip(candidates, kept) if keep]
                if not candidates:
                    break
            _, i = min(candidates)
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols
