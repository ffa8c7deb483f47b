"""The small CLIP: shapes, input checks, save/load, pad handling, overfitting, caption perturbations,
and an exactly resumable training run."""
import numpy as np
import pytest
import torch

from dalle_proto.clip import ClipConfig, ClipEnsemble, ClipModel, load_clip
from dalle_proto.clip_training import ClipCollate, ClipTrainConfig, clip_loss, perturb_caption, train_clip
from dalle_proto.shapes_evaluator import evaluate_each
from dalle_proto.datasets.augmentation import pil_to_tensor
from dalle_proto.datasets.shapes import ShapesDataset, parse_caption
from dalle_proto.datasets.shapes_grammar import is_held_out
from dalle_proto.text_tokenizer import TextTokenizer, TextTokenizerConfig

SIZE = 32


@pytest.fixture(scope="module")
def text_tokenizer():
    dataset = ShapesDataset(300, size=SIZE)
    captions = [c for i in range(len(dataset)) for c in dataset.captions(i)]
    return TextTokenizer.from_captions(captions, TextTokenizerConfig(vocab_size=300, text_len=20, bpe_dropout=0.0))


def tiny_config(text_tokenizer, **overrides) -> ClipConfig:
    values = dict(text_vocab_size=text_tokenizer.total_vocab_size, text_len=text_tokenizer.text_len,
                  image_size=SIZE, embed_dim=32, image_width=8, image_stages=2, text_width=32,
                  text_layers=1, text_heads=2)
    return ClipConfig(**{**values, **overrides})


def shapes_batch(text_tokenizer, count: int, unique: bool = True):
    dataset = ShapesDataset(200, seed=3, size=SIZE)
    images, captions = [], []
    for i in range(len(dataset)):
        image, caption = dataset[i]
        if unique and caption in captions:
            continue
        images.append(pil_to_tensor(image))
        captions.append(caption)
        if len(captions) == count:
            break
    return {"images": torch.stack(images), "text_ids": text_tokenizer.encode(captions),
            "negative_ids": torch.empty(0, text_tokenizer.text_len, dtype=torch.long),
            "negative_owner": torch.empty(0, dtype=torch.long)}, captions


def test_embeddings_are_unit_vectors_and_score_is_their_cosine(text_tokenizer):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer)).eval()
    batch, captions = shapes_batch(text_tokenizer, 4)
    image_emb, text_emb = model.encode_image(batch["images"]), model.encode_text(batch["text_ids"])
    assert image_emb.shape == text_emb.shape == (4, 32)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(model.score(batch["images"], batch["text_ids"]), (image_emb * text_emb).sum(-1))
    empty = model.encode_text(text_tokenizer.null_ids()[None])  # the all-pad caption is defined too
    assert torch.isfinite(empty).all()


def test_pad_embeddings_do_not_change_a_caption_embedding(text_tokenizer):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer)).eval()
    ids = text_tokenizer.encode(["a red circle", "three blue stars"])
    before = model.encode_text(ids)
    with torch.no_grad():
        model.text_encoder.token_embedding.weight[text_tokenizer.vocab_size:] += 5.0
    torch.testing.assert_close(model.encode_text(ids), before)


def test_bad_inputs_are_clear_errors(text_tokenizer):
    model = ClipModel(tiny_config(text_tokenizer))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*max 255"):
        model.encode_image(torch.full((1, 3, SIZE, SIZE), 255.0))
    with pytest.raises(ValueError, match=rf"\(B, 3, {SIZE}, {SIZE}\).*got Tensor torch.float32 \(1, 3, 16, 16\)"):
        model.encode_image(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="text ids must be in"):
        model.encode_text(torch.full((1, text_tokenizer.text_len), 10**6))
    with pytest.raises(ValueError, match="multiple of 2 \\*\\* image_stages"):
        tiny_config(text_tokenizer, image_size=36, image_stages=3)


def test_save_load_round_trip_and_strict_loading(text_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer)).eval()
    batch, _ = shapes_batch(text_tokenizer, 3)
    model.save_pretrained(tmp_path / "clip")
    loaded = ClipModel.from_pretrained(tmp_path / "clip")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.score(batch["images"], batch["text_ids"]),
                               model.score(batch["images"], batch["text_ids"]), rtol=0, atol=0)
    state = {**model.state_dict(), "extra.weight": torch.zeros(1)}
    from dalle_proto.pretrained import save_component

    save_component(tmp_path / "bad", model.config, state)
    with pytest.raises(ValueError, match=r"bad.*model.safetensors.*unexpected keys \['extra.weight'\]"):
        ClipModel.from_pretrained(tmp_path / "bad")


def test_ensemble_scores_the_members_mean_cosine_and_its_embeddings_agree(text_tokenizer):
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(ClipModel(tiny_config(text_tokenizer)).eval())
    ensemble = ClipEnsemble(members).eval()
    batch, _ = shapes_batch(text_tokenizer, 4)
    images, ids = batch["images"], batch["text_ids"]
    mean = torch.stack([m.score(images, ids) for m in members]).mean(0)  # (4,)
    torch.testing.assert_close(ensemble.score(images, ids), mean)
    image_emb, text_emb = ensemble.encode_image(images), ensemble.encode_text(ids)
    assert image_emb.shape == text_emb.shape == (4, 3 * 32)
    assert (ensemble.member_count, ensemble.embedding_size) == (3, 3 * 32)
    assert (members[0].member_count, members[0].embedding_size) == (1, 32)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close((image_emb * text_emb).sum(-1), mean)
    assert not torch.equal(members[0].score(images, ids), members[1].score(images, ids))


def test_load_clip_reads_a_single_clip_or_an_ensemble_and_resaving_replaces_the_other(text_tokenizer, tmp_path):
    torch.manual_seed(0)
    single = ClipModel(tiny_config(text_tokenizer)).eval()
    ensemble = ClipEnsemble([single, ClipModel(tiny_config(text_tokenizer)).eval()])
    batch, _ = shapes_batch(text_tokenizer, 3)
    folder = tmp_path / "clip"
    single.save_pretrained(folder)
    ensemble.save_pretrained(folder)  # over the single CLIP: its config.json / weights are removed
    assert sorted(p.name for p in folder.iterdir()) == ["ensemble.json", "member_0", "member_1"]
    loaded = load_clip(folder)
    assert isinstance(loaded, ClipEnsemble) and len(loaded.members) == 2
    torch.testing.assert_close(loaded.score(batch["images"], batch["text_ids"]),
                               ensemble.score(batch["images"], batch["text_ids"]), rtol=0, atol=0)
    single.save_pretrained(folder)  # and back: a stale ensemble.json would shadow the single CLIP
    assert isinstance(load_clip(folder), ClipModel)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ensemble.json").write_text('{"members": 0}')
    with pytest.raises(ValueError, match=r"bad/ensemble.json: members must be an integer >= 1; got 0"):
        load_clip(tmp_path / "bad")
    with pytest.raises(ValueError, match="share one ClipConfig"):
        ClipEnsemble([single, ClipModel(tiny_config(text_tokenizer, embed_dim=16))])


def test_text_embedding_sees_word_order_from_the_start(text_tokenizer):
    # a bag-of-words text encoder cannot rerank relations: a caption and its swapped version must
    # differ already at initialisation (with N(0, 1) token embeddings they were at cosine 0.9999)
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer))
    ids = text_tokenizer.encode(["a red circle to the left of a blue square",
                                 "a blue square to the left of a red circle"])
    with torch.no_grad():
        first, swapped = model.encode_text(ids)
    assert float(first @ swapped) < 0.99


def test_tiny_clip_overfits_one_shapes_batch(text_tokenizer):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer))
    batch, _ = shapes_batch(text_tokenizer, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = clip_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        similarity = model.encode_image(batch["images"]) @ model.encode_text(batch["text_ids"]).T  # (8, 8)
    assert (similarity.argmax(1) == torch.arange(8)).all() and (similarity.argmax(0) == torch.arange(8)).all()


def test_identical_captions_are_not_negatives_of_each_other(text_tokenizer):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer))
    batch, _ = shapes_batch(text_tokenizer, 4)
    batch["text_ids"][1] = batch["text_ids"][0]  # two images of one caption
    loss, _ = clip_loss(model, batch)
    with torch.no_grad():
        image_emb, text_emb = model(batch["images"], batch["text_ids"])
        logits = model.temperature_scale() * image_emb @ text_emb.T  # (4, 4)
        logits[0, 1] = logits[1, 0] = float("-inf")  # the other copy of one's own caption is no negative
        target = torch.arange(4)
        expected = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(loss.detach(), expected)


def test_caption_perturbations_change_one_thing_and_respect_the_held_out_pairs():
    rng = np.random.default_rng(0)
    captions = ["a red circle", "a picture of a large blue star in the top left",
                "a red circle to the left of a blue square", "three yellow triangles"]
    for caption in captions:
        spec = parse_caption(caption)
        for _ in range(50):
            new = perturb_caption(caption, rng)
            assert new is not None and new != caption
            new_spec = parse_caption(new)  # still the grammar
            assert new_spec["type"] == spec["type"] and new_spec["prefix"] == spec["prefix"]
            assert not any(is_held_out(o["color"], o["shape"]) for o in new_spec["objects"])
    assert perturb_caption("a photo of my cat", rng) is None
    first = [perturb_caption(c, np.random.default_rng(1)) for c in captions]
    assert first == [perturb_caption(c, np.random.default_rng(1)) for c in captions]


def test_pair_perturbations_include_the_binding_changes():
    rng = np.random.default_rng(0)
    caption = "a red circle to the left of a blue square"
    exchanged = {"a blue circle to the left of a red square", "a red square to the left of a blue circle"}
    plain = {perturb_caption(caption, rng) for _ in range(200)}
    assert {"a blue square to the left of a red circle", "a red circle to the right of a blue square"} <= plain
    assert not plain & exchanged  # colours / shapes exchanged only when asked for
    assert exchanged <= {perturb_caption(caption, rng, exchanges=True) for _ in range(200)}


def test_copy_perturbations_copy_one_objects_colour_or_shape_onto_the_other():
    rng = np.random.default_rng(0)
    caption = "a black diamond below a black triangle"
    found = {perturb_caption(caption, rng, copies=True) for _ in range(100)}
    # copying black onto black changes nothing; a shape copy leaves two identical objects
    assert found == {"a black diamond below a black diamond", "a black triangle below a black triangle"}
    found = {perturb_caption("a red circle to the left of a blue square", rng, copies=True) for _ in range(100)}
    assert found == {"a red circle to the left of a red square", "a blue circle to the left of a blue square",
                     "a red circle to the left of a blue circle", "a red square to the left of a blue square"}
    assert perturb_caption("a red circle", rng, copies=True) is None  # pairs only
    assert perturb_caption("three yellow triangles", rng, copies=True) is None


def test_copy_negatives_are_renders_for_pair_captions_only(text_tokenizer):
    dataset = ShapesDataset(12, seed=1, size=SIZE)
    samples = [(3, slot, pil_to_tensor(dataset[slot][0]), dataset[slot][1]) for slot in range(12)]
    pairs = [i for i, (_, _, _, caption) in enumerate(samples) if parse_caption(caption)["type"] == "pair"]
    assert pairs  # the seed gives this batch some pairs
    batch = ClipCollate(text_tokenizer, 0, seed=0, to_tensor=pil_to_tensor, copy_negatives=2)(samples)
    assert batch["negative_images"].shape == (2 * len(pairs), 3, SIZE, SIZE)
    assert batch["negative_image_owner"].tolist() == [i for i in pairs for _ in range(2)]
    captions = [samples[i][3] for i in batch["negative_image_owner"].tolist()]
    assert not any(r.correct for r in evaluate_each(batch["negative_images"], captions))  # all true negatives


def test_caption_negatives_are_scored_and_raise_the_loss(text_tokenizer):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer))
    batch, captions = shapes_batch(text_tokenizer, 4)
    plain, _ = clip_loss(model, batch)
    rng = np.random.default_rng(0)
    negatives = [perturb_caption(c, rng) for c in captions]
    batch |= {"negative_ids": text_tokenizer.encode(negatives), "negative_owner": torch.arange(4)}
    harder, metrics = clip_loss(model, batch)
    assert harder > plain and 0 <= float(metrics["hard_acc"]) <= 1


def test_image_negatives_are_renders_of_perturbed_captions_that_miss_their_caption(text_tokenizer):
    dataset = ShapesDataset(6, seed=1, size=SIZE)
    samples = [(7, slot, pil_to_tensor(dataset[slot][0]), dataset[slot][1]) for slot in range(6)]
    collate = ClipCollate(text_tokenizer, caption_negatives=1, seed=0, image_negatives=2, to_tensor=pil_to_tensor)
    batch = collate(samples)
    assert batch["images"].shape == (6, 3, SIZE, SIZE) and batch["negative_ids"].shape[0] == 6
    assert batch["negative_images"].shape == (12, 3, SIZE, SIZE)
    assert batch["negative_image_owner"].tolist() == [i for i in range(6) for _ in range(2)]
    captions = [dataset[i][1] for i in batch["negative_image_owner"].tolist()]
    assert not any(r.correct for r in evaluate_each(batch["negative_images"], captions))  # all true negatives
    again = collate(samples)  # a pure function of (seed, step, slot): resumable
    assert torch.equal(again["negative_images"], batch["negative_images"])


def test_image_negatives_raise_the_loss_and_are_measured(text_tokenizer):
    torch.manual_seed(0)
    model = ClipModel(tiny_config(text_tokenizer))
    batch, captions = shapes_batch(text_tokenizer, 4)
    plain, metrics = clip_loss(model, batch)
    assert torch.isnan(metrics["hard_image_acc"])
    samples = [(0, i, image, caption) for i, (image, caption) in enumerate(zip(batch["images"], captions))]
    negatives = ClipCollate(text_tokenizer, 0, seed=0, image_negatives=1, to_tensor=pil_to_tensor)(samples)
    batch |= {k: negatives[k] for k in ("negative_images", "negative_image_owner")}
    harder, metrics = clip_loss(model, batch)
    assert harder > plain and 0 <= float(metrics["hard_image_acc"]) <= 1


def test_resumed_training_equals_uninterrupted_training(text_tokenizer, tmp_path):
    config = tiny_config(text_tokenizer)
    train_config = ClipTrainConfig(steps=4, batch_size=6, warmup_steps=1, checkpoint_every=2, log_every=1,
                                   accelerator="cpu", caption_negatives=1, image_negatives=1)
    dataset = ShapesDataset(20, size=SIZE)
    straight = train_clip(config, train_config, text_tokenizer, dataset, tmp_path / "straight", progress=False)
    train_clip(config, train_config, text_tokenizer, dataset, tmp_path / "resumed", max_steps=2, progress=False)
    resumed = train_clip(config, train_config, text_tokenizer, dataset, tmp_path / "resumed", progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert (tmp_path / "resumed" / "clip" / "model.safetensors").is_file()
    first = ClipModel(config).state_dict()
    assert any(not torch.equal(first[k], v) for k, v in straight.state_dict().items())  # it did train
    csv = next((tmp_path / "straight" / "logs").glob("version_*/metrics.csv")).read_text()
    assert "train/acc" in csv and "train/hard_acc" in csv and "train/hard_image_acc" in csv
