"""The text tokenizer: BPE dropout only in training mode, per-position pads, save/load round-trips."""
from __future__ import annotations

import json
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from dalle_proto.bpe_dropout import BpeMerges

from dalle_proto.text_tokenizer import (
    TOKENIZER_FILE,
    TextTokenizer,
    TextTokenizerConfig,
    train_text_tokenizer,
)

COLOURS = "red orange yellow green cyan blue purple black".split()
SHAPES = "circle square triangle diamond star cross".split()
POSITIONS = ["in the top left", "at the top", "on the right", "in the center", "at the bottom"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]
PREFIXES = ["", "a picture of ", "an image of ", "a drawing of "]
EXTRA = ["a cat sitting on a wooden chair", "two dogs playing in the snow", "an old man reading a book",
         "a bowl of fresh fruit on the kitchen table", "a train crossing a bridge at sunset"]


def make_captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    caps = []
    for i in range(n):
        kind = rng.random()
        c1, c2, s1, s2 = rng.choice(COLOURS), rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(SHAPES)
        if kind < 0.45:
            cap = f"a {rng.choice(['small ', 'large ', ''])}{c1} {s1} {rng.choice(POSITIONS)}"
        elif kind < 0.8:
            cap = f"a {c1} {s1} {rng.choice(RELATIONS)} a {c2} {s2}"
        else:
            cap = f"{rng.choice(['two', 'three', 'four'])} {c1} {s1}{'es' if s1 == 'cross' else 's'}"
        caps.append(rng.choice(PREFIXES) + cap)
    return caps + EXTRA * 2


CAPTIONS = make_captions()
TEXT_LEN = 24


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(vocab_size=16384, text_len=TEXT_LEN))


def test_requested_vocab_larger_than_data_gives_true_size(tok):
    # 16384 requested, but 300 short captions support far fewer merges: vocab_size is the real size.
    assert 256 < tok.vocab_size < 1000
    assert tok.vocab_size == tok._tokenizer.get_vocab_size(with_added_tokens=True)
    assert sorted(tok._tokenizer.get_vocab().values()) == list(range(tok.vocab_size))
    assert tok.total_vocab_size == tok.vocab_size + TEXT_LEN
    ids = tok.encode(CAPTIONS)
    bpe = ids[ids < tok.vocab_size]
    assert bpe.numel() > 0 and int(bpe.max()) < tok.vocab_size


def test_small_requested_vocab_is_respected():
    small = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(vocab_size=270, text_len=8))
    assert small.vocab_size == 270
    with pytest.warns(UserWarning, match="truncated"):  # 8 ids of a byte-level vocabulary hold little
        assert int(small.encode(CAPTIONS).max()) < small.total_vocab_size == 278


def test_batch_shape_and_dtype(tok):
    batch = tok.encode(CAPTIONS[:5])
    assert batch.shape == (5, TEXT_LEN) and batch.dtype == torch.long
    single = tok.encode(CAPTIONS[0])
    assert single.shape == (TEXT_LEN,) and single.dtype == torch.long
    assert torch.equal(batch[0], single)
    assert tok.encode([]).shape == (0, TEXT_LEN)


def test_per_position_pads(tok):
    null = tok.null_ids()
    assert torch.equal(null, tok.vocab_size + torch.arange(TEXT_LEN))
    assert len(set(null.tolist())) == TEXT_LEN  # every position's pad differs
    assert bool((null >= tok.vocab_size).all()) and bool((null < tok.total_vocab_size).all())
    ids = tok.encode("a red circle")
    n = len(tok.encode_ids("a red circle"))
    assert 0 < n < TEXT_LEN
    assert bool((ids[:n] < tok.vocab_size).all())
    assert torch.equal(ids[n:], tok.vocab_size + torch.arange(n, TEXT_LEN))  # pad at i is V + i


def test_empty_caption_is_null_text(tok):
    assert torch.equal(tok.encode(""), tok.null_ids())
    assert torch.equal(tok.encode("   "), tok.null_ids())  # whitespace normalises to nothing
    batch = tok.encode(["a red circle", ""])
    assert torch.equal(batch[1], tok.null_ids())
    assert tok.decode(tok.null_ids()) == ""


def test_lowercase_and_whitespace_normalisation(tok):
    assert torch.equal(tok.encode("A RED Circle"), tok.encode("a red circle"))
    assert torch.equal(tok.encode("  a   red\tcircle \n"), tok.encode("a red circle"))
    assert tok.normalize("  A  Red\tCIRCLE ") == "a red circle"
    cased = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(text_len=TEXT_LEN, lowercase=False))
    assert not torch.equal(cased.encode("A RED Circle"), cased.encode("a red circle"))


def test_truncation(tok):
    long_caption = " and ".join(CAPTIONS[:10])
    wide = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(text_len=200))
    full = wide.encode_ids(long_caption)
    assert len(full) > TEXT_LEN
    with pytest.warns(UserWarning, match=rf"caption 0 .* has {len(full)} text tokens, more than "
                                         rf"text_len={TEXT_LEN}: truncated to the first {TEXT_LEN}$"):
        ids = tok.encode(long_caption)
    assert ids.tolist() == full[:TEXT_LEN]  # same vocab (same data): the first text_len ids, no pads
    with pytest.warns(UserWarning, match="truncated"):
        assert len(tok.encode_ids(long_caption)) == TEXT_LEN
    with pytest.warns(UserWarning, match=r"caption 1 .* \(1 more in this batch\)"):
        assert tok.encode(["a red circle", long_caption, long_caption]).shape == (3, TEXT_LEN)


def test_decode_inverts_encode(tok):
    captions = CAPTIONS[:50] + ["A Large BLUE star   in the top left"]
    decoded = tok.decode(tok.encode(captions))
    assert decoded == [tok.normalize(c) for c in captions]
    assert decoded[-1] == "a large blue star in the top left"
    assert tok.decode(tok.encode(CAPTIONS[3])) == CAPTIONS[3]
    assert tok.decode(tok.encode(CAPTIONS[3]).tolist()) == CAPTIONS[3]
    # byte-level: words and characters never seen in training still round-trip
    wide = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(text_len=64))
    assert wide.decode(wide.encode("Zébra ünïcode 😀 #42")) == "zébra ünïcode 😀 #42"


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="total_vocab_size"):
        tok.decode([0, tok.total_vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(torch.tensor([-1, 3]))


def test_bpe_dropout_only_in_training_mode(tok):
    caption = "a large purple triangle to the right of a small orange diamond"
    assert tok.training is False  # default: eval
    reference = tuple(tok.encode_ids(caption))
    assert tok.train() is tok and tok.training
    with_dropout = {tuple(tok.encode(caption).tolist()) for _ in range(20)}
    assert len(with_dropout) > 1
    batch = tok.encode([caption] * 20)
    assert len({tuple(row) for row in batch.tolist()}) > 1  # the batch path drops merges too
    assert tok.eval() is tok and not tok.training
    without = {tuple(tok.encode_ids(caption)) for _ in range(20)}
    assert without == {reference}  # deterministic again, and the same as before training mode
    tok.train(False)
    assert not tok.training


def test_bpe_dropout_never_cuts_off_a_caption_that_fits_without_it():
    caption = "a drawing of a purple star to the right of a large orange cross"
    fitted = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(vocab_size=16384, text_len=TEXT_LEN,
                                                                        bpe_dropout=0.5))
    deterministic = fitted.encode_ids(caption)
    tight = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(vocab_size=16384, bpe_dropout=0.5,
                                                                       text_len=len(deterministic)))
    tight.train()
    # dropout at 0.5 splits words into more ids than text_len holds: those rows fall back to the
    # deterministic ids, so every row still decodes to the whole caption
    rows = tight.encode([caption] * 50)
    assert set(tight.decode(rows)) == {caption}
    assert [tight.encode_ids(caption) for _ in range(5)] == [deterministic] * 5
    short = "a red circle"  # short captions keep their dropout variety
    assert len({tuple(row) for row in tight.encode([short] * 50).tolist()}) > 1


def test_bpe_dropout_is_a_function_of_its_generator():
    tok = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(text_len=TEXT_LEN, bpe_dropout=0.3)).train()
    captions = CAPTIONS[:40]
    first = tok.encode(captions, rng=np.random.default_rng(7))
    assert torch.equal(tok.encode(captions, rng=np.random.default_rng(7)), first)  # same seed, same ids
    assert not torch.equal(tok.encode(captions, rng=np.random.default_rng(8)), first)
    assert tok.decode(first) == [tok.normalize(c) for c in captions]  # dropout only splits words
    # one generator per caption: a caption's ids do not depend on the rest of its batch
    per_caption = tok.encode(captions, rng=[np.random.default_rng([3, i]) for i in range(40)])
    alone = tok.encode(captions[5], rng=np.random.default_rng([3, 5]))
    assert torch.equal(per_caption[5], alone)
    with pytest.raises(ValueError, match="a list of 40 \\(one per caption\\), got 2 item"):
        tok.encode(captions, rng=[np.random.default_rng(0)] * 2)
    # more dropout, more (shorter) pieces; eval mode ignores the generator
    lengths = {p: sum(len(TextTokenizer(tok._tokenizer, TextTokenizerConfig(
        vocab_size=tok.vocab_size, text_len=64, bpe_dropout=p)).train().encode_ids(c, np.random.default_rng(0)))
        for c in captions) for p in (0.0, 0.1, 0.5)}
    assert lengths[0.0] < lengths[0.1] < lengths[0.5]
    assert torch.equal(tok.eval().encode(captions, rng=np.random.default_rng(7)), tok.encode(captions))


def test_dropout_merges_equal_the_library_without_dropout(tok):
    """BpeMerges applies the library's own merges: with p = 0 it gives the library's ids."""
    merges = BpeMerges.from_tokenizer_json(json.loads(tok._tokenizer.to_str()))
    extra = ["Zébra ünïcode 😀 #42", "aaaa aaaaaaa", "the the the", "  a,red;circle!!  "]
    for caption in CAPTIONS + extra:
        text = tok._tokenizer.normalizer.normalize_str(caption)
        pieces = [piece for piece, _ in tok._tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        assert merges.encode(pieces, 0.0, np.random.default_rng(0)) [:TEXT_LEN] == tok._tokenizer.encode(caption).ids, caption
    with pytest.raises(ValueError, match="ignore_merges"):
        data = json.loads(tok._tokenizer.to_str())
        data["model"]["ignore_merges"] = True
        BpeMerges.from_tokenizer_json(data)


def test_zero_dropout_is_deterministic_in_training_mode():
    plain = TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(text_len=TEXT_LEN, bpe_dropout=0.0))
    plain.train()
    assert len({tuple(plain.encode_ids(CAPTIONS[7])) for _ in range(20)}) == 1


def test_pickled_copy_keeps_mode(tok):
    # DataLoader workers get a pickled copy: training mode (and its dropout) must survive.
    tok.train()
    try:
        copy = pickle.loads(pickle.dumps(tok))
    finally:
        tok.eval()
    assert copy.training
    assert len({tuple(copy.encode_ids(CAPTIONS[1])) for _ in range(30)}) > 1
    assert copy.eval().encode_ids(CAPTIONS[1]) == tok.encode_ids(CAPTIONS[1])


def test_save_load_round_trip(tok, tmp_path):
    tok.train()  # saving in training mode must not change what is saved or the mode
    path = tok.save_pretrained(tmp_path / "text_tokenizer")
    assert tok.training
    tok.eval()
    assert path == tmp_path / "text_tokenizer" / TOKENIZER_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [TOKENIZER_FILE]  # one file, no temp left
    loaded = TextTokenizer.from_pretrained(path.parent)
    assert loaded.config == tok.config
    assert loaded.vocab_size == tok.vocab_size and loaded.total_vocab_size == tok.total_vocab_size
    assert loaded.training is False
    assert torch.equal(loaded.encode(CAPTIONS), tok.encode(CAPTIONS))
    assert torch.equal(loaded.null_ids(), tok.null_ids())
    loaded.train()  # the dropout probability survived the file
    assert len({tuple(loaded.encode_ids(CAPTIONS[2])) for _ in range(30)}) > 1
    # the file stays a plain tokenizers JSON
    raw = Tokenizer.from_file(str(path))
    raw.model.dropout = None
    assert raw.encode(CAPTIONS[0]).ids == tok.encode_ids(CAPTIONS[0])


def test_non_default_config_round_trips(tmp_path):
    config = TextTokenizerConfig(vocab_size=300, text_len=11, bpe_dropout=0.25, lowercase=False, min_frequency=3)
    original = TextTokenizer.from_captions(CAPTIONS, config)
    original.save_pretrained(tmp_path)
    loaded = TextTokenizer.from_pretrained(tmp_path)
    assert loaded.config == original.config == TextTokenizerConfig(
        vocab_size=300, text_len=11, bpe_dropout=0.25, lowercase=False, min_frequency=3)


def test_train_text_tokenizer_saves(tmp_path):
    out = tmp_path / "out"
    trained = train_text_tokenizer(iter(CAPTIONS), TextTokenizerConfig(text_len=TEXT_LEN), out, progress=False)
    assert (out / TOKENIZER_FILE).is_file() and not trained.training
    loaded = TextTokenizer.from_pretrained(out)
    assert torch.equal(loaded.encode(CAPTIONS[:20]), trained.encode(CAPTIONS[:20]))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / TOKENIZER_FILE)):
        TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        TextTokenizer.from_pretrained(tmp_path)


def test_load_rejects_file_without_text_len(tok, tmp_path):
    data = json.loads(tok._tokenizer.to_str())
    data["truncation"] = None
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="truncation.max_length"):
        TextTokenizer.from_pretrained(tmp_path)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="vocab_size=100"):
        TextTokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="bpe_dropout"):
        TextTokenizerConfig(bpe_dropout=1.0)
    with pytest.raises(ValueError, match="no captions"):
        TextTokenizer.from_captions([], TextTokenizerConfig())
    with pytest.raises(TypeError, match="caption 1: expected str, got int"):
        TextTokenizer.from_captions(["a red circle", 3], TextTokenizerConfig())


def test_char_bpe_kind_pads_with_one_token_and_round_trips(tmp_path):
    """kind="char_bpe" (minDALL-E's tokenizer, loaded from vocab.json + merges.txt): [PAD] fills
    every position after the caption; tests/test_mindalle.py checks its ids against minDALL-E's."""
    from tokenizers import CharBPETokenizer

    bpe = CharBPETokenizer(unk_token="[UNK]", lowercase=True)
    bpe.train_from_iterator(CAPTIONS, vocab_size=100, min_frequency=1, special_tokens=["[UNK]"], show_progress=False)
    vocab, merges = bpe.save_model(str(tmp_path), "bpe")
    tok = TextTokenizer.from_char_bpe(vocab, merges, text_len=8)
    assert tok.config.kind == "char_bpe" and tok.pad_id == tok.vocab_size - 1  # [PAD] appended
    assert tok.total_vocab_size == tok.vocab_size
    ids = tok.encode(["A Red circle", "a red circle"])
    assert torch.equal(ids[0], ids[1]) and ids[0, -1] == tok.pad_id
    assert torch.equal(tok.null_ids(), torch.full((8,), tok.pad_id))
    assert tok.decode(ids[0]) == "a red circle"
    tok.save_pretrained(tmp_path / "saved")
    loaded = TextTokenizer.from_pretrained(tmp_path / "saved")
    assert loaded.config == tok.config and loaded.pad_id == tok.pad_id
    assert torch.equal(loaded.encode("a red circle"), ids[0])
    with pytest.raises(ValueError, match="kind='char_bpe'.*no BPE dropout"):
        TextTokenizerConfig(kind="char_bpe", bpe_dropout=0.1)
    with pytest.raises(ValueError, match="from_char_bpe"):
        TextTokenizer.from_captions(CAPTIONS, TextTokenizerConfig(kind="char_bpe", bpe_dropout=0.0))
