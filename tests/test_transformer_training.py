"""Transformer training: schedule, parameter groups, batches, a short run's outputs, exact resume."""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from dalle_proto.datasets.shapes import ShapesDataset
from dalle_proto.image_grid import make_image_grid
from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from dalle_proto.text_tokenizer import TextTokenizer, TextTokenizerConfig
from dalle_proto.token_cache import TokenCache, encode_to_cache
from dalle_proto.transformer import DalleTransformer, TransformerConfig
from dalle_proto.transformer_data import CaptionCollate, FixedBatchSampler, StepBatchSampler, split_indices
from dalle_proto.transformer_training import (TransformerTrainConfig, lr_at, optimizer_param_groups,
                                              train_transformer)


# ---- a tiny world: 48 shapes scenes at 32 px, a random 8x8-grid image tokenizer, a small BPE ----
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("world")
    shapes = ShapesDataset(count=48, seed=0, size=32)
    image_tokenizer = ImageTokenizer(ImageTokenizerConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], z_channels=32,
                                                          embed_dim=8, n_embed=256)).eval()
    cache = TokenCache(encode_to_cache(image_tokenizer, shapes, folder / "cache", batch_size=48, progress=False))
    captions = [shapes[i][1] for i in range(len(shapes))]
    text_tokenizer = TextTokenizer.from_captions(captions, TextTokenizerConfig(vocab_size=320, text_len=16,
                                                                               bpe_dropout=0.0))
    config = TransformerConfig.from_size("tiny", text_vocab_size=text_tokenizer.vocab_size, dropout=0.1)
    # the same vocabulary and merges with the paper's BPE dropout on (0.1)
    bpe_tokenizer = TextTokenizer(text_tokenizer._tokenizer, TextTokenizerConfig(
        vocab_size=text_tokenizer.vocab_size, text_len=16, bpe_dropout=0.1))
    return dict(cache=cache, image_tokenizer=image_tokenizer, text_tokenizer=text_tokenizer, config=config,
                captions=captions, bpe_tokenizer=bpe_tokenizer)


def fast_config(**overrides) -> TransformerTrainConfig:
    values = dict(steps=4, batch_size=4, warmup_steps=2, precision="32-true", accelerator="cpu", val_every=2,
                  val_batches=1, val_fraction=0.1, sample_every=0, checkpoint_every=2, log_every=1, seed=3)
    return TransformerTrainConfig(**{**values, **overrides})


def checkpoint(out_dir: Path) -> dict:
    return torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def weights(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}


# ---- pure pieces ---------------------------------------------------------------------------------
def test_lr_warmup_then_schedules():
    c = TransformerTrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="constant")
    assert [lr_at(c, s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(c, 10) == lr_at(c, 109) == pytest.approx(1e-3)
    cosine = TransformerTrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cosine, 9) == pytest.approx(1e-3)
    assert lr_at(cosine, 10) == pytest.approx(1e-3)
    assert lr_at(cosine, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway
    assert lr_at(cosine, 110) == pytest.approx(1e-4)
    plateau = TransformerTrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="plateau")
    assert lr_at(plateau, 50, plateau_halvings=2) == pytest.approx(2.5e-4)
    assert lr_at(TransformerTrainConfig(warmup_steps=0, lr_schedule="constant"), 0) == pytest.approx(4.5e-4)
    with pytest.raises(ValueError, match="lr_schedule"):
        TransformerTrainConfig(lr_schedule="linear")


def test_weight_decay_only_on_linear_weight_matrices():
    model = DalleTransformer(TransformerConfig.from_size("tiny"))
    decay, no_decay = optimizer_param_groups(model, 0.045)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.045 and no_decay["weight_decay"] == 0.0
    assert decayed == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) for n in [f"{n}.weight"]}
    assert not any(n.endswith(".bias") or "norm" in n or "embedding" in n or n in ("text_position", "image_row")
                   for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    tied = DalleTransformer(TransformerConfig.from_size("tiny", tie_embeddings=True))
    tied_decay = {id(p) for p in optimizer_param_groups(tied, 0.1)[0]["params"]}
    assert id(tied.text_embedding.weight) not in tied_decay  # a tied head is an embedding table


def test_batches_follow_the_step_and_shard_by_rank():
    one = StepBatchSampler(range(10), batch_size=4, total_steps=6, seed=1)
    batches = list(one)
    assert len(batches) == len(one) == 6
    stream = [index for batch in batches for _, _, index, _ in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # passes
    assert stream[:10] != stream[10:20]  # each pass reshuffles
    assert [k[3] for k in batches[3]] == [1, 1, 1, 1]  # positions 12..15 are in the second pass
    resumed = StepBatchSampler(range(10), batch_size=4, total_steps=6, seed=1, start_step=lambda: 4)
    assert list(resumed) == batches[4:]
    ranks = [list(StepBatchSampler(range(10), batch_size=2, total_steps=6, seed=1, rank=r, world_size=2))
             for r in (0, 1)]
    assert [b0 + b1 for b0, b1 in zip(*ranks)] == batches  # two ranks split each global batch


def test_caption_dropout_rate_and_bpe_dropout_only_in_training(world):
    tok = world["text_tokenizer"]
    samples = [(step, slot, torch.zeros(8, 8, dtype=torch.long), "a red circle")
               for step in range(500) for slot in range(8)]
    collate = CaptionCollate(tok, train=True, caption_dropout=0.1, seed=0)
    text_ids = collate(samples)["text_ids"]  # (4000, T)
    null = torch.arange(tok.vocab_size, tok.total_vocab_size)
    dropped = (text_ids == null).all(1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.02  # binomial sd 0.005
    assert (text_ids[~dropped] == tok.eval().encode("a red circle")).all()
    assert torch.equal(collate(samples)["text_ids"], text_ids)  # a function of (seed, step, slot)
    assert not (CaptionCollate(tok, train=False, caption_dropout=0.1, seed=0)(samples)["text_ids"] == null).all(1).any()

    bpe = TextTokenizer.from_captions(world["captions"], TextTokenizerConfig(vocab_size=320, text_len=16,
                                                                            bpe_dropout=0.5))
    captions = [(0, i, torch.zeros(8, 8, dtype=torch.long), c) for i, c in enumerate(world["captions"])]
    reference = bpe.eval().encode(world["captions"])
    assert torch.equal(CaptionCollate(bpe, train=False, caption_dropout=0.0, seed=0)(captions)["text_ids"], reference)
    dropped = CaptionCollate(bpe, train=True, caption_dropout=0.0, seed=0)(captions)["text_ids"]
    assert not torch.equal(dropped, reference)
    # BPE dropout too is a function of (seed, step, slot): the same again, another seed or step differs,
    # and a sample's ids do not depend on the rest of its batch
    assert torch.equal(CaptionCollate(bpe, train=True, caption_dropout=0.0, seed=0)(captions)["text_ids"], dropped)
    assert not torch.equal(CaptionCollate(bpe, train=True, caption_dropout=0.0, seed=1)(captions)["text_ids"], dropped)
    later = [(1, slot, image, caption) for _, slot, image, caption in captions]
    assert not torch.equal(CaptionCollate(bpe, train=True, caption_dropout=0.0, seed=0)(later)["text_ids"], dropped)
    assert torch.equal(CaptionCollate(bpe, train=True, caption_dropout=0.0, seed=0)(captions[7:9])["text_ids"],
                       dropped[7:9])


def test_validation_batches_are_split_evenly_over_ranks():
    one = list(FixedBatchSampler(range(10), batch_size=4, max_batches=5))
    assert [[key[2] for key in batch] for batch in one] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(FixedBatchSampler(range(10), batch_size=4, max_batches=2)) == 2
    # 3 batches over 4 ranks: rank 3 would have none (and stop DDP); it repeats batch 0 instead
    ranks = [[[key[2] for key in batch] for batch in FixedBatchSampler(range(10), 4, 5, rank=r, world_size=4)]
             for r in range(4)]
    assert ranks == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]], [[0, 1, 2, 3]]]
    two = [[[key[2] for key in batch] for batch in FixedBatchSampler(range(10), 4, 5, rank=r, world_size=2)]
           for r in range(2)]
    assert two == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7], [0, 1, 2, 3]]]


def test_truncated_captions_are_reported_once_per_loader(world, recwarn):
    tok = world["text_tokenizer"]
    long = " and ".join(world["captions"][:4])
    collate = CaptionCollate(tok, train=True, caption_dropout=0.0, seed=0)
    for step in range(3):  # every step truncates the same long caption
        collate([(step, 0, torch.zeros(8, 8, dtype=torch.long), long)])
    messages = [str(w.message) for w in recwarn.list]
    assert len(messages) == 1 and messages[0].endswith(
        "truncated to the first 16; later truncations in this run's training batches are not reported")
    with pytest.warns(UserWarning, match="truncated to the first 16$"):
        tok.eval().encode(long)  # a prompt at sampling time always says so


def test_image_grid_layout_and_errors():
    images = torch.full((3, 3, 16, 16), -1.0)  # black
    images[1] = 1.0  # white
    grid = make_image_grid(images, captions=["a red circle", "b", "c"], columns=2, padding=4, min_side=32)
    array = np.asarray(grid)
    assert grid.size == (2 * (32 + 4) + 4, grid.size[1]) and grid.size[1] > 2 * (32 + 4)  # captions add height
    assert (array[4:36, 4:36] == 0).all() and (array[4:36, 40:72] == 255).all()  # upscaled 2x, in order
    plain = make_image_grid([Image.new("RGB", (8, 8), (255, 0, 0))] * 4, min_side=0, padding=0)
    assert plain.size == (16, 16) and plain.getpixel((15, 15)) == (255, 0, 0)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        make_image_grid(images, captions=["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_image_grid(torch.zeros(2, 16, 16))


def test_mismatched_parts_are_refused(world, tmp_path):
    wrong = TransformerConfig.from_size("tiny", text_vocab_size=world["text_tokenizer"].vocab_size, text_len=8)
    with pytest.raises(ValueError, match="text_len is 16 but TransformerConfig.text_len is 8"):
        train_transformer(wrong, fast_config(), world["text_tokenizer"], world["cache"], None, tmp_path)


# ---- runs ----------------------------------------------------------------------------------------
class RecordRawWeights(pl.Callback):
    """Raw parameters after every update, to recompute the EMA independently."""

    def __init__(self):
        self.history: list[tuple[int, list[torch.Tensor]]] = []

    def on_train_start(self, trainer, pl_module):
        self.history.append((0, [p.detach().clone() for p in pl_module.model.parameters()]))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history.append((trainer.global_step, [p.detach().clone() for p in pl_module.model.parameters()]))


def test_short_run_writes_checkpoint_samples_val_loss_and_ema_export(world, tmp_path):
    record = RecordRawWeights()
    config = fast_config(ema_decay=0.9, sample_every=2, sample_captions=["a red circle", "two blue stars"])
    model = train_transformer(world["config"], config, world["text_tokenizer"], world["cache"], None, tmp_path,
                              image_tokenizer=world["image_tokenizer"], callbacks=[record])

    state = checkpoint(tmp_path)
    assert state["global_step"] == 4
    for step in (2, 4):
        grid = Image.open(tmp_path / "samples" / f"step_{step:06d}.png")
        assert grid.width >= 2 * 128  # two captions side by side, upscaled to at least 128 px
    rows = list(csv.DictReader(open(next((tmp_path / "logs").glob("version_*/metrics.csv")))))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and all(math.isfinite(v) and 0 < v < 10 for v in val)  # at steps 2 and 4
    lrs = [float(r["lr"]) for r in rows if r.get("lr")]
    assert lrs[:2] == pytest.approx([config.lr / 2, config.lr])  # warm-up over 2 steps

    exported = DalleTransformer.from_pretrained(tmp_path / "transformer")
    ema, raw = weights(state, "ema_model.transformer."), weights(state, "model.transformer.")
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    expected = record.history[0][1]  # recompute the EMA from the raw weights after each update
    for step, params in record.history[1:]:
        update = step - 1  # 0-based index of the update that produced `params`
        decay = min(config.ema_decay, (1 + update) / (10 + update))
        expected = [e + (1 - decay) * (p - e) for e, p in zip(expected, params)]
    assert all(torch.allclose(e, p, atol=1e-6) for e, p in zip(expected, exported.parameters()))


class Crashed(RuntimeError):
    pass


class Crash(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise Crashed(f"simulated crash after step {self.at_step}")


@pytest.mark.parametrize("checkpoint_every, val_every", [(3, 2), (3, 3)])
def test_resume_after_crash_equals_uninterrupted_run(world, tmp_path, checkpoint_every, val_every):
    """(3, 2): last.ckpt from the end of step 3, no validation there; (3, 3): saved after step 3's
    validation, whose plateau decision must survive. Model dropout, caption dropout and the paper's
    BPE dropout (0.1) are on: the same run twice is identical, and so is a resumed one."""
    config = fast_config(steps=6, checkpoint_every=checkpoint_every, val_every=val_every, lr_schedule="plateau",
                         plateau_patience=1, plateau_threshold=0.5, caption_dropout=0.3)
    args = (world["config"], config, world["bpe_tokenizer"], world["cache"], None)
    straight = train_transformer(*args, tmp_path / "straight")
    if val_every == 2:  # once is enough: the same command twice, from scratch
        train_transformer(*args, tmp_path / "twice")
        first, second = checkpoint(tmp_path / "straight")["state_dict"], checkpoint(tmp_path / "twice")["state_dict"]
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(Crashed):
        train_transformer(*args, tmp_path / "resumed", callbacks=[Crash(at_step=5)])
    assert checkpoint(tmp_path / "resumed")["global_step"] == 3
    resumed = train_transformer(*args, tmp_path / "resumed")

    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 6
    assert a["plateau"]["halvings"] >= 1 and a["plateau"] == b["plateau"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # raw and EMA
    assert all(torch.equal(a["optimizer_states"][0]["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
               for i, s in b["optimizer_states"][0]["state"].items())
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    rows = list(csv.DictReader(open(next((tmp_path / "resumed" / "logs").glob("version_1/metrics.csv")))))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [s - 1 for s in range(4, 7) if s % val_every == 0]

    again = train_transformer(*args, tmp_path / "resumed")  # a finished run: nothing to train, same export
    assert checkpoint(tmp_path / "resumed")["global_step"] == 6
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), again.state_dict().values()))


def test_fsdp_strategy_wraps_blocks_and_each_copy_as_its_own_unit():
    """FSDP needs a GPU, so only the construction is checked here: one unit per transformer block
    and one per TransformerLoss, so that the raw and EMA copies are sharded alike."""
    from lightning.pytorch.strategies import FSDPStrategy

    from dalle_proto.transformer import Block
    from dalle_proto.transformer_training import TransformerLoss, _strategy

    strategy = _strategy(TransformerTrainConfig(strategy="fsdp"))
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block, TransformerLoss}
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "full"
    assert _strategy(TransformerTrainConfig(strategy="ddp")) == "ddp"


# ---- caption contrast and init_from ---------------------------------------------------------------
def test_contrast_negatives_are_seeded_perturbations_and_skip_dropped_or_foreign_captions(world):
    tok = world["text_tokenizer"]
    captions = ["a red circle to the left of a blue square", "three yellow triangles", "a photo of my cat"]
    samples = [(7, slot, torch.zeros(8, 8, dtype=torch.int16), c) for slot, c in enumerate(captions)]
    batch = CaptionCollate(tok, True, 0.0, seed=3, contrast=True)(samples)
    assert batch["contrast_index"].tolist() == [0, 1]  # the cat is outside the grammar
    assert batch["contrast_text_ids"].shape == (2, tok.text_len)
    for row, ids in zip(batch["contrast_index"].tolist(), batch["contrast_text_ids"]):
        assert not torch.equal(ids, batch["text_ids"][row])
        negative = tok.decode(ids.tolist())
        assert negative != captions[row] and sorted(negative.split()) != [] and "cat" not in negative
    again = CaptionCollate(tok, True, 0.0, seed=3, contrast=True)(samples)
    assert torch.equal(again["contrast_text_ids"], batch["contrast_text_ids"])  # a function of (seed, step, slot)
    other_step = CaptionCollate(tok, True, 0.0, seed=3, contrast=True)([(8, *s[1:]) for s in samples])
    assert other_step["contrast_index"].tolist() == [0, 1]
    # dropped captions (the null text) get no negative
    dropped = CaptionCollate(tok, True, 0.99, seed=3, contrast=True)(samples)
    assert dropped["contrast_index"].tolist() == []
    assert dropped["contrast_text_ids"].shape == (0, tok.text_len)
    assert "contrast_text_ids" not in CaptionCollate(tok, True, 0.0, seed=3)(samples)


def test_binding_negatives_exchange_or_copy_pair_attributes_and_change_the_number(world):
    from dalle_proto.caption_perturbations import perturb_binding
    from dalle_proto.datasets.shapes_grammar import is_held_out, parse_caption
    rng = np.random.default_rng(0)
    pair = "a red circle to the left of a blue square"
    seen = {perturb_binding(pair, rng) for _ in range(200)}
    # exchanges and copies only: the relation, the order and the set of attributes' words stay
    assert seen == {"a blue circle to the left of a red square", "a red square to the left of a blue circle",
                    "a red circle to the left of a red square", "a blue circle to the left of a blue square",
                    "a red circle to the left of a blue circle", "a red square to the left of a blue square"}
    assert {perturb_binding("three yellow triangles", rng) for _ in range(100)} == {
        "two yellow triangles", "four yellow triangles"}
    for _ in range(200):
        single = parse_caption(perturb_binding("a large blue star in the top left", rng))["objects"][0]
        assert (single["size"], single["position"]) == ("large", "in the top left")  # colour or shape only
        assert (single["color"] == "blue") != (single["shape"] == "star")
        assert not is_held_out(single["color"], single["shape"])
    assert perturb_binding("a photo of my cat", rng) is None
    # exchanges only: the same words in another order, and nothing for other scene kinds
    for _ in range(20):
        exchanged = perturb_binding(pair, rng, exchanges_only=True)
        assert exchanged != pair and sorted(exchanged.split()) == sorted(pair.split())
        assert parse_caption(exchanged)["relation"] == parse_caption(pair)["relation"]
    assert perturb_binding("three red circles", rng, exchanges_only=True) is None
    assert perturb_binding("a large blue star in the top left", rng, exchanges_only=True) is None
    # the collate draws them with negatives="binding"; an unknown kind is refused
    tok = world["text_tokenizer"]
    samples = [(7, slot, torch.zeros(8, 8, dtype=torch.int16), c) for slot, c in enumerate([pair] * 8)]
    batch = CaptionCollate(tok, True, 0.0, seed=3, contrast=True, negatives="binding")(samples)
    assert {tok.decode(ids.tolist()) for ids in batch["contrast_text_ids"]} <= seen
    mixed = [(7, slot, torch.zeros(8, 8, dtype=torch.int16), c) for slot, c in enumerate([pair, "three red circles"] * 2)]
    batch = CaptionCollate(tok, True, 0.0, seed=3, contrast=True, negatives="exchange")(mixed)
    assert batch["contrast_index"].tolist() == [0, 2]  # the pairs only
    with pytest.raises(ValueError, match="contrast negatives must be one of"):
        CaptionCollate(tok, True, 0.0, seed=3, contrast=True, negatives="hard")
    with pytest.raises(ValueError, match="contrast_negatives must be one of"):
        TransformerTrainConfig(contrast_negatives="hard")


def test_converse_relations_restate_right_and_below_pairs_as_seeded_converses(world):
    from dalle_proto.caption_perturbations import converse_caption
    assert converse_caption("a red circle below a blue square") == "a blue square above a red circle"
    assert converse_caption("an image of an orange star to the right of a red circle") == \
        "an image of a red circle to the left of an orange star"  # prefix and articles follow the words
    assert converse_caption("a red circle to the left of a blue square") == "a blue square to the right of a red circle"
    for caption in ("three yellow triangles", "a large blue star in the top left", "a photo of my cat below"):
        assert converse_caption(caption) is None
    tok = world["text_tokenizer"]
    captions = ["a red circle below a blue square", "a green cross to the right of a red circle",
                "a red circle above a blue square", "a red circle to the left of a blue square",
                "three yellow triangles", "a photo of my cat below the table"]
    samples = [(step, slot, torch.zeros(8, 8, dtype=torch.int16), c)
               for step in range(40) for slot, c in enumerate(captions)]
    collate = CaptionCollate(tok, True, 0.0, seed=3, converse_relations=0.5)
    said = {}
    for step, slot, _, caption in samples:
        said.setdefault(caption, set()).add(collate.restated(caption, step, slot))
    # only "to the right of" / "below" are restated, as their converse, about half the time
    assert said[captions[0]] == {captions[0], "a blue square above a red circle"}
    assert said[captions[1]] == {captions[1], "a red circle to the left of a green cross"}
    for caption in captions[2:]:
        assert said[caption] == {caption}
    restated = sum(collate.restated(captions[0], step, 0) != captions[0] for step in range(400))
    assert 150 < restated < 250
    # the batch encodes the restated caption; a function of (seed, step, slot); never in validation
    step = next(s for s in range(40) if collate.restated(captions[0], s, 0) != captions[0])
    batch = collate([(step, 0, torch.zeros(8, 8, dtype=torch.int16), captions[0])])
    assert torch.equal(batch["text_ids"][0], tok.train(False).encode(["a blue square above a red circle"])[0])
    again = CaptionCollate(tok, True, 0.0, seed=3, converse_relations=0.5)([(step, 0, torch.zeros(8, 8), captions[0])])
    assert torch.equal(again["text_ids"], batch["text_ids"])
    val = CaptionCollate(tok, False, 0.0, seed=3, converse_relations=0.5)([(step, 0, torch.zeros(8, 8), captions[0])])
    assert torch.equal(val["text_ids"][0], tok.train(False).encode([captions[0]])[0])
    off = CaptionCollate(tok, True, 0.0, seed=3)
    assert all(off.restated(captions[0], s, 0) == captions[0] for s in range(40))  # 0 (the default): off
    # a curriculum: every one restated in the first 10 steps, none after
    first = CaptionCollate(tok, True, 0.0, seed=3, converse_relations=1.0, converse_steps=10)
    assert {first.restated(captions[0], s, 0) for s in range(10)} == {"a blue square above a red circle"}
    assert {first.restated(captions[0], s, 0) for s in range(10, 50)} == {captions[0]}
    with pytest.raises(ValueError, match="converse_steps must be >= 1 and needs converse_relations > 0"):
        TransformerTrainConfig(converse_steps=100)
    with pytest.raises(ValueError, match="converse_steps must be >= 1 .* got 0"):
        CaptionCollate(tok, True, 0.0, seed=3, converse_relations=1.0, converse_steps=0)
    with pytest.raises(ValueError, match="converse_relations must be in"):
        CaptionCollate(tok, True, 0.0, seed=3, converse_relations=1.5)
    with pytest.raises(ValueError, match="converse_relations must be in"):
        TransformerTrainConfig(converse_relations=-0.1)


def test_contrast_loss_is_the_log_likelihood_ratio_of_caption_and_negative(world):
    from dalle_proto.transformer_training import TransformerLoss

    torch.manual_seed(0)
    model = DalleTransformer(world["config"]).eval()
    loss_fn = TransformerLoss(model, contrast_weight=0.5, contrast_beta=0.2)
    c = world["config"]
    text = torch.randint(0, c.text_vocab_size, (3, c.text_len))
    image = torch.randint(0, c.image_vocab_size, (3, c.image_len))
    negatives, index = torch.randint(0, c.text_vocab_size, (2, c.text_len)), torch.tensor([2, 0])
    with torch.no_grad():
        loss, parts = loss_fn(text, image, negatives, index)
        plain, plain_parts = model.loss(text, image)

        def log_likelihood(t, x):  # summed over the image tokens, one row at a time
            _, logits = model(t[None], x[None])
            return -torch.nn.functional.cross_entropy(logits[0].float(), x, reduction="sum")
        delta = torch.stack([log_likelihood(text[r], image[r]) - log_likelihood(negatives[j], image[r])
                             for j, r in enumerate(index.tolist())])
    assert torch.allclose(parts["image_loss"], plain_parts["image_loss"], atol=1e-5)
    assert torch.allclose(parts["text_loss"], plain_parts["text_loss"], atol=1e-5)
    expected_contrast = torch.nn.functional.softplus(-0.2 * delta).mean()
    assert torch.allclose(parts["contrast_loss"], expected_contrast, atol=1e-4)
    assert torch.allclose(loss, plain + 0.5 * expected_contrast, atol=1e-4)
    assert parts["contrast_acc"].item() == (delta > 0).float().mean().item()
    # no negatives in the batch: exactly the plain loss
    empty = loss_fn(text, image, negatives[:0], index[:0])[0]
    assert torch.equal(empty, model.loss(text, image)[0])


def test_contrast_loss_raises_the_margin_on_one_batch_and_training_logs_it(world, tmp_path):
    from dalle_proto.transformer_training import TransformerLoss

    tok, c = world["text_tokenizer"], world["config"]
    samples = [(0, slot, world["cache"][i][0], world["cache"][i][1]) for slot, i in enumerate(range(8))]
    batch = CaptionCollate(tok, False, 0.0, seed=0, contrast=True)(samples)
    margins = {}
    for weight in (0.0, 1.0):  # the same 40 Adam steps on one batch, with and without the contrast
        torch.manual_seed(0)
        loss_fn = TransformerLoss(DalleTransformer(c).eval(), contrast_weight=weight, contrast_beta=0.5)
        optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-3)
        for _ in range(40):
            optimizer.zero_grad()
            loss_fn(**batch)[0].backward()
            optimizer.step()
        margins[weight] = loss_fn(**batch)[1]["contrast_delta"].item()
    assert margins[1.0] > margins[0.0] + 5.0 and margins[1.0] > 5.0

    config = fast_config(steps=4, contrast_weight=1.0, caption_dropout=0.0)
    train_transformer(c, config, tok, world["cache"], None, tmp_path)
    rows = list(csv.DictReader(open(next((tmp_path / "logs").glob("version_*/metrics.csv")))))
    assert any(r.get("val/contrast_delta") for r in rows) and any(r.get("train/contrast_acc") for r in rows)


def test_contrast_reference_is_ccas_form_and_stays_out_of_the_module_tree(world, tmp_path):
    import copy

    from dalle_proto.transformer_training import TransformerLoss

    c, tok = world["config"], world["text_tokenizer"]
    torch.manual_seed(0)
    reference = DalleTransformer(c).eval()
    model = copy.deepcopy(reference)
    loss_fn = TransformerLoss(model, contrast_weight=0.5, contrast_beta=0.2, reference=reference)
    assert list(loss_fn.state_dict()) == ["transformer." + k for k in model.state_dict()]
    assert len(list(loss_fn.parameters())) == len(list(model.parameters()))
    text = torch.randint(0, c.text_vocab_size, (3, c.text_len))
    image = torch.randint(0, c.image_vocab_size, (3, c.image_len))
    negatives, index = torch.randint(0, c.text_vocab_size, (2, c.text_len)), torch.tensor([2, 0])
    with torch.no_grad():
        _, parts = loss_fn(text, image, negatives, index)  # equal weights: both log-ratios are 0
        assert abs(parts["contrast_positive"].item()) < 1e-3 and abs(parts["contrast_negative"].item()) < 1e-3
        assert abs(parts["contrast_loss"].item() - 2 * math.log(2)) < 1e-3
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

        def log_likelihood(net, t, x):  # summed over the image tokens
            return -torch.nn.functional.cross_entropy(net(t[None], x[None])[1][0].float(), x, reduction="sum")
        pos = torch.stack([log_likelihood(model, text[r], image[r]) - log_likelihood(reference, text[r], image[r])
                           for r in index.tolist()])
        neg = torch.stack([log_likelihood(model, negatives[j], image[r]) - log_likelihood(reference, negatives[j], image[r])
                           for j, r in enumerate(index.tolist())])
    loss, parts = loss_fn(text, image, negatives, index)
    softplus = torch.nn.functional.softplus
    expected = (softplus(-0.2 * pos) + softplus(0.2 * neg)).mean()
    assert torch.allclose(parts["contrast_loss"], expected, atol=1e-4)
    assert torch.allclose(loss, model.loss(text, image)[0] + 0.5 * expected, atol=1e-4)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())

    with pytest.raises(ValueError, match="contrast_reference needs contrast_weight > 0 and init_from"):
        TransformerTrainConfig(contrast_weight=1.0, contrast_reference=True)
    reference.save_pretrained(tmp_path / "start")
    config = fast_config(steps=2, contrast_weight=1.0, contrast_reference=True, caption_dropout=0.0,
                         init_from=str(tmp_path / "start"))
    train_transformer(c, config, tok, world["cache"], None, tmp_path / "run")
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "logs").glob("version_*/metrics.csv")))))
    assert any(r.get("val/contrast_positive") for r in rows) and any(r.get("train/contrast_negative") for r in rows)
    assert not any("_reference" in k for k in checkpoint(tmp_path / "run")["state_dict"])


def test_init_from_starts_from_saved_weights_and_refuses_another_shape(world, tmp_path):
    torch.manual_seed(5)
    saved = DalleTransformer(world["config"])
    saved.save_pretrained(tmp_path / "pipe" / "transformer")
    config = fast_config(steps=1, lr=1e-12, warmup_steps=1, ema_decay=0.0, val_every=0, caption_dropout=0.0,
                         init_from=str(tmp_path / "pipe"))
    tuned = train_transformer(world["config"], config, world["text_tokenizer"], world["cache"], None, tmp_path / "a")
    # one step at lr 1e-12 leaves the saved weights (to float precision); a fresh seed-3 init would not
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(saved.state_dict().values(), tuned.state_dict().values()))
    other = TransformerConfig.from_size("tiny", text_vocab_size=world["config"].text_vocab_size, depth=1)
    with pytest.raises(ValueError, match=r"init_from=.*depth \(1 saved, 2 here\)"):
        DalleTransformer(other).save_pretrained(tmp_path / "shallow")
        train_transformer(world["config"], fast_config(init_from=str(tmp_path / "shallow")), world["text_tokenizer"],
                          world["cache"], None, tmp_path / "b")


def test_init_from_may_add_a_text_encoder_that_starts_as_the_identity(world, tmp_path):
    from dalle_proto.transformer_training import _init_from

    prefix = dict(text_attention="bidirectional", text_loss_weight=0.0)
    base = dataclasses.replace(world["config"], **prefix)
    torch.manual_seed(7)
    saved = DalleTransformer(base).eval()
    saved.save_pretrained(tmp_path / "base")
    torch.manual_seed(8)
    grown = DalleTransformer(dataclasses.replace(base, text_encoder_depth=2)).eval()
    _init_from(grown, str(tmp_path / "base"))
    text = torch.randint(0, base.text_vocab_size, (2, base.text_len))
    image = torch.randint(0, base.image_vocab_size, (2, base.image_len))
    with torch.no_grad():
        torch.testing.assert_close(grown(text, image)[1], saved(text, image)[1], atol=1e-5, rtol=0)
    grown.save_pretrained(tmp_path / "grown")
    with pytest.raises(ValueError, match=r"init_from=.*text_encoder_depth \(2 saved, 0 here\)"):
        _init_from(DalleTransformer(base), str(tmp_path / "grown"))  # dropping an encoder would lose weights
    with pytest.raises(ValueError, match=r"init_from=.*depth \(2 saved, 3 here\)"):
        _init_from(DalleTransformer(dataclasses.replace(base, depth=3, text_encoder_depth=1)), str(tmp_path / "base"))


def test_code_pixels_come_from_the_image_tokenizer_and_are_exported(world, tmp_path):
    config = dataclasses.replace(world["config"], code_pixels=3 * 4 * 4)  # the world's tokenizer: f = 4
    train = fast_config(steps=2, val_every=2, checkpoint_every=2)
    model = train_transformer(config, train, world["text_tokenizer"], world["cache"], None, tmp_path,
                              image_tokenizer=world["image_tokenizer"])
    grids = torch.stack([world["cache"][i][0] for i in range(len(world["cache"]))])  # (48, 8, 8)
    train_indices, _ = split_indices(len(grids), train.val_fraction, train.seed)  # validation pictures excluded
    expected = world["image_tokenizer"].code_pixels(grids[train_indices])  # (256, 48)
    assert torch.equal(model.code_pixel_values, expected)
    assert torch.equal(DalleTransformer.from_pretrained(tmp_path / "transformer").code_pixel_values, expected)
    with pytest.raises(ValueError, match="code_pixels needs the image tokenizer"):
        train_transformer(config, train, world["text_tokenizer"], world["cache"], None, tmp_path / "none")
    with pytest.raises(ValueError, match=r"code_pixels=12, but this image tokenizer's codes each decode to 3 x 4 x 4 "
                                         r"= 48 pixel values: set transformer.code_pixels=48"):
        train_transformer(dataclasses.replace(config, code_pixels=12), train, world["text_tokenizer"], world["cache"],
                          None, tmp_path / "wrong", image_tokenizer=world["image_tokenizer"])
