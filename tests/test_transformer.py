"""DalleTransformer: shapes, causality under every mask kind, loss, overfitting, sizes, save/load."""
import pytest
import torch
import torch.nn.functional as F

from dalle_proto.attention_masks import ATTENTION_MODES
from dalle_proto.transformer import SIZES, DalleTransformer, TransformerConfig


def small_config(**overrides) -> TransformerConfig:
    values = dict(text_vocab_size=50, text_len=5, image_vocab_size=40, image_grid=4, dim=32, depth=3,
                  heads=2, head_dim=16, conv_kernel=3)
    return TransformerConfig(**{**values, **overrides})


def random_batch(config: TransformerConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.text_total_vocab, (batch, config.text_len), generator=g)
    image = torch.randint(0, config.image_vocab_size, (batch, config.image_len), generator=g)
    return text, image


def test_forward_shapes_and_loss_parts():
    c = small_config()
    model = DalleTransformer(c)
    text, image = random_batch(c, batch=3)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (3, c.text_len - 1, c.text_vocab_size + c.text_len)
    assert image_logits.shape == (3, c.image_len, c.image_vocab_size)
    loss, parts = model.loss(text, image)
    assert set(parts) == {"text_loss", "image_loss"}
    expected = c.text_loss_weight * parts["text_loss"] + c.image_loss_weight * parts["image_loss"]
    assert torch.allclose(loss, expected)
    # fresh GPT-2 init: near-uniform predictions
    assert abs(parts["image_loss"].item() - torch.log(torch.tensor(40.0)).item()) < 0.3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_weights_are_configurable():
    c = small_config(text_loss_weight=1.0, image_loss_weight=0.0)
    model = DalleTransformer(c)
    text, image = random_batch(c)
    loss, parts = model.loss(text, image)
    assert torch.allclose(loss, parts["text_loss"])


def assert_image_tokens_are_causal(model: DalleTransformer, text: torch.Tensor, image: torch.Tensor) -> None:
    """Changing image token j moves no text logit and no logit predicting image tokens 0..j, but
    does move the one predicting token j + 1 (every mask sees itself)."""
    text_logits, image_logits = model(text, image)
    for j in (0, 5, 10):
        image2 = image.clone()
        image2[0, j] = (image2[0, j] + 1) % model.config.image_vocab_size
        t3, i3 = model(text, image2)
        assert torch.equal(t3, text_logits)
        assert torch.equal(i3[:, : j + 1], image_logits[:, : j + 1])
        assert not torch.allclose(i3[:, j + 1], image_logits[:, j + 1])


@pytest.mark.parametrize("attention", ATTENTION_MODES)
def test_perturbing_a_later_token_never_changes_earlier_logits(attention):
    c = small_config(attention=attention)
    model = DalleTransformer(c).eval()
    text, image = random_batch(c, batch=1)
    text_logits, image_logits = model(text, image)
    # change text token 3: text predictions from positions 0..2 must not move
    text2 = text.clone()
    text2[0, 3] = (text2[0, 3] + 1) % c.text_total_vocab
    t2, i2 = model(text2, image)
    assert torch.equal(t2[:, :3], text_logits[:, :3])
    assert not torch.allclose(i2, image_logits)  # image tokens do see the whole text
    assert_image_tokens_are_causal(model, text, image)


@pytest.mark.parametrize("attention", ["sparse", "full"])
def test_bidirectional_text_sees_the_whole_caption_and_image_stays_causal(attention):
    c = small_config(attention=attention, text_attention="bidirectional", text_loss_weight=0.0)
    model = DalleTransformer(c).eval()
    text, image = random_batch(c, batch=1)
    text_logits, image_logits = model(text, image)
    text2 = text.clone()
    text2[0, 3] = (text2[0, 3] + 1) % c.text_total_vocab
    t2, _ = model(text2, image)
    assert not torch.allclose(t2[:, 0], text_logits[:, 0])  # text position 0 sees token 3 now
    causal = DalleTransformer(small_config(attention=attention)).eval()
    causal.load_state_dict(model.state_dict())
    assert torch.equal(causal(text2, image)[0][:, :3], causal(text, image)[0][:, :3])  # the paper's: it does not
    assert_image_tokens_are_causal(model, text, image)  # image tokens are still generated causally
    loss, parts = model.loss(text, image)  # the text is an input only
    assert parts["text_loss"].item() == 0.0 and torch.allclose(loss, c.image_loss_weight * parts["image_loss"])
    with pytest.raises(ValueError, match="set text_loss_weight=0"):
        small_config(text_attention="bidirectional")
    with pytest.raises(ValueError, match="'causal' or 'bidirectional'"):
        small_config(text_attention="prefix")


@pytest.mark.parametrize("text_attention", ["causal", "bidirectional"])
def test_fast_block_sparse_path_equals_dense_masked_attention(text_attention):
    c = small_config(image_grid=5, depth=4, text_attention=text_attention,
                     text_loss_weight=0.0 if text_attention == "bidirectional" else 1 / 8)
    model = DalleTransformer(c).eval()
    text, image = random_batch(c, batch=2)
    fast = model(text, image)
    with model.dense_attention():
        dense = model(text, image)
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    c = small_config(dim=64, depth=2, heads=2, head_dim=32)
    model = DalleTransformer(c)
    text, image = random_batch(c, batch=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        loss, parts = model.loss(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after {step + 1} steps"


def test_null_text_is_all_pads():
    c = small_config()
    model = DalleTransformer(c)
    null = model.null_text_ids(3)
    assert null.shape == (3, 5) and null.dtype == torch.long
    assert null[1].tolist() == [50, 51, 52, 53, 54]


def test_bad_input_shapes_are_named():
    c = small_config()
    model = DalleTransformer(c)
    text, image = random_batch(c)
    with pytest.raises(ValueError, match=r"text_ids must have shape \(B, 5\)"):
        model(text[:, :4], image)
    with pytest.raises(ValueError, match=r"image_ids must have shape \(2, 16\)"):
        model(text, image[:, :15])


def test_sizes_registry_and_unknown_size_error():
    assert TransformerConfig.from_size("peer").dim == 256
    c = TransformerConfig.from_size("peer", depth=2)
    assert c.depth == 2 and c.heads == 8 and c.head_dim == 32
    with pytest.raises(ValueError, match=r"unknown transformer size 'huge'; valid sizes: .*'paper-12b'"):
        TransformerConfig.from_size("huge")
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerConfig(attention="axial")
    assert {"tiny", "peer", "paper-12b"} <= set(SIZES)


def test_paper_12b_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = DalleTransformer(TransformerConfig.from_size("paper-12b"))
    n = model.num_parameters()
    print(f"paper-12b parameters: {n:,}")
    assert abs(n - 12.0e9) / 12.0e9 < 0.02
    assert model.kinds.count("column") == 16 and model.kinds[-1] == "conv"


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, tie):
    c = small_config(tie_embeddings=tie, sandwich_norm=True)
    model = DalleTransformer(c).eval()
    model.save_pretrained(tmp_path / "transformer")
    loaded = DalleTransformer.from_pretrained(tmp_path / "transformer").eval()
    assert loaded.config == c
    text, image = random_batch(c)
    for a, b in zip(model(text, image), loaded(text, image)):
        assert torch.equal(a, b)
    if tie:
        assert loaded.image_head.weight is loaded.image_embedding.weight


@pytest.mark.parametrize("tie", [False, True])
def test_loading_in_bf16_equals_casting_after_an_fp32_load(tmp_path, tie):
    """from_pretrained(dtype=bf16) builds the model in bf16 and casts each weight as it is read:
    exactly the model of an fp32 load followed by .to(bf16), buffers included; the default dtype
    is restored."""
    c = small_config(tie_embeddings=tie)
    DalleTransformer(c).save_pretrained(tmp_path / "t")  # fp32 on disk
    normal = torch.nn.init.normal_
    cast = DalleTransformer.from_pretrained(tmp_path / "t").to(torch.bfloat16)
    direct = DalleTransformer.from_pretrained(tmp_path / "t", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # restored, and so are nn.init's fillers:
    assert torch.nn.init.normal_ is normal and torch.nn.Linear(4, 4).weight.abs().sum() > 0
    a, b = dict(cast.named_buffers()) | cast.state_dict(), dict(direct.named_buffers()) | direct.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert direct.image_head.weight.dtype == torch.bfloat16
    if tie:
        assert direct.image_head.weight is direct.image_embedding.weight
    text, image = random_batch(c)
    assert torch.equal(cast(text, image)[1], direct(text, image)[1])


def test_loading_weights_of_another_size_fails_loudly(tmp_path):
    DalleTransformer(small_config(dim=48)).save_pretrained(tmp_path / "t")
    config_file = tmp_path / "t" / "config.json"
    config_file.write_text(config_file.read_text().replace('"dim": 48', '"dim": 32'))
    with pytest.raises(ValueError, match="shape mismatches"):
        DalleTransformer.from_pretrained(tmp_path / "t")


def test_one_pad_id_and_raster_positions_minDALL_E_layout(tmp_path):
    """text_pad_id: the text vocabulary is V (its pad id among it); image_position="raster": one
    learned position per image token. The KV-cache steps still equal the forward pass."""
    c = small_config(attention="full", text_pad_id=49, image_position="raster")
    model = DalleTransformer(c).eval()
    assert c.text_total_vocab == 50 and model.text_head.out_features == 50
    assert model.image_position.shape == (16, 32) and not hasattr(model, "image_row")
    assert model.null_text_ids(2).tolist() == [[49] * 5] * 2
    text, image = random_batch(c)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (2, 4, 50)
    with torch.no_grad():
        cache = model.new_cache(2)
        cached = [model.prefill_text(text, cache)] + [model.decode_image_token(image[:, j], j, cache)
                                                      for j in range(c.image_len - 1)]
    torch.testing.assert_close(torch.stack(cached, dim=1), image_logits, atol=1e-5, rtol=1e-5)
    image2 = image.clone()
    image2[:, 3] = (image2[:, 3] + 1) % c.image_vocab_size  # causal: the logits for tokens 0..3 stay
    assert torch.equal(model(text, image2)[1][:, :4], image_logits[:, :4])
    model.save_pretrained(tmp_path / "t")
    loaded = DalleTransformer.from_pretrained(tmp_path / "t").eval()
    assert loaded.config == c and torch.equal(loaded(text, image)[1], image_logits)
    with pytest.raises(ValueError, match=r"text_pad_id must be None or in \[0, text_vocab_size=50\)"):
        small_config(text_pad_id=50)
    with pytest.raises(ValueError, match="image_position must be 'row_column' or 'raster'"):
        small_config(image_position="1d")


def test_text_encoder_blocks_read_the_whole_caption_before_the_main_stack():
    c = small_config(text_attention="bidirectional", text_loss_weight=0.0, text_encoder_depth=2)
    model = DalleTransformer(c).eval()
    plain = DalleTransformer(small_config(text_attention="bidirectional", text_loss_weight=0.0))
    block = sum(p.numel() for p in model.text_encoder[0].parameters())
    assert len(model.text_encoder) == 2 and model.num_parameters() == plain.num_parameters() + 2 * block
    assert len(model.blocks) == c.depth and model.kinds == plain.kinds  # the KV cache's layers are unchanged
    text, image = random_batch(c)
    raw = model.text_embedding(text) + model.text_position  # (B, T, D)
    assert torch.equal(model._embed_text(text), raw)  # each block starts as the identity (zero residual writes)
    with torch.no_grad():  # as after training: the blocks write into the residual stream
        for block in model.text_encoder:
            block.attn.out.weight.normal_(std=0.02), block.mlp.proj.weight.normal_(std=0.02)
    encoded = model._embed_text(text)  # (B, T, D)
    assert encoded.shape == (2, c.text_len, c.dim) and not torch.allclose(encoded, raw)
    text2 = text.clone()
    text2[0, -1] = (text2[0, -1] + 1) % c.text_vocab_size
    assert not torch.allclose(model._embed_text(text2)[0, 0], encoded[0, 0])  # the first word sees the last
    assert torch.equal(model._embed_text(text2)[1], encoded[1])
    assert_image_tokens_are_causal(model, text, image)
    loss, _ = model.loss(text, image)
    loss.backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters())
    with pytest.raises(ValueError, match="set text_attention='bidirectional'"):
        small_config(text_encoder_depth=1)
    with pytest.raises(ValueError, match="text_encoder_depth must be an int >= 0"):
        small_config(text_attention="bidirectional", text_loss_weight=0.0, text_encoder_depth=-1)


def test_text_encoder_save_load_round_trip(tmp_path):
    c = small_config(text_attention="bidirectional", text_loss_weight=0.0, text_encoder_depth=1)
    model = DalleTransformer(c).eval()
    model.save_pretrained(tmp_path / "t")
    loaded = DalleTransformer.from_pretrained(tmp_path / "t")
    assert loaded.config == c
    text, image = random_batch(c)
    assert torch.equal(loaded(text, image)[1], model(text, image)[1])


def test_code_pixels_inform_image_embeddings_and_head(tmp_path):
    c = small_config(code_pixels=12)
    torch.manual_seed(0)
    model = DalleTransformer(c).eval()
    text, image = random_batch(c)
    with pytest.raises(ValueError, match=r"code pixel values must have shape \(40, 12\) .* got \(40, 48\)"):
        model.set_code_pixels(torch.zeros(40, 48))
    blank = model(text, image)[1]
    pixels = torch.rand(40, 12) * 2 - 1
    model.set_code_pixels(pixels)
    _, logits = model(text, image)
    assert logits.shape == (2, c.image_len, 40) and not torch.allclose(logits, blank)
    # two codes that decode alike get the same pixel term: their input rows differ by the learned tables only
    pixels[7] = pixels[3]
    model.set_code_pixels(pixels)
    table2, head2 = model._image_input_table(), model._image_head_weight()
    torch.testing.assert_close(table2[7] - model.image_embedding.weight[7], table2[3] - model.image_embedding.weight[3])
    torch.testing.assert_close(head2[7] - model.image_head.weight[7], head2[3] - model.image_head.weight[3])
    assert_image_tokens_are_causal(model, text, image)
    loss, _ = model.loss(text, image)
    loss.backward()
    assert all(p.grad is not None for p in [*model.code_pixel_in.parameters(), *model.code_pixel_out.parameters()])
    model.save_pretrained(tmp_path / "t")  # the pixels travel with the weights
    loaded = DalleTransformer.from_pretrained(tmp_path / "t").eval()
    assert loaded.config == c and torch.equal(loaded.code_pixel_values, pixels)
    assert torch.equal(loaded(text, image)[1], model(text, image)[1])
    # the head's pixel term is centred over codes: the same probabilities as the raw term, no shared offset
    term = model._image_head_weight() - model.image_head.weight  # (Vi, D)
    torch.testing.assert_close(term.mean(dim=0), torch.zeros(c.dim), atol=1e-6, rtol=0)
    x = torch.randn(2, 5, c.dim)
    raw = F.linear(x, model.image_head.weight + model.code_pixel_out(pixels))  # (2, 5, Vi)
    torch.testing.assert_close(model._image_logits(x).log_softmax(-1), raw.log_softmax(-1), atol=1e-5, rtol=0)
    tied = DalleTransformer(small_config(code_pixels=12, tie_embeddings=True))
    tied_in, tied_head = tied._image_input_table(), tied._image_head_weight()
    assert tied.code_pixel_out is None and torch.equal(tied_in, tied_head)
    with pytest.raises(ValueError, match=r"takes no code pixels \(TransformerConfig.code_pixels=0\)"):
        DalleTransformer(small_config()).set_code_pixels(torch.zeros(40, 12))
    with pytest.raises(ValueError, match="code_pixels must be an int >= 0"):
        small_config(code_pixels=-1)


def test_code_pixels_head_false_keeps_free_head_rows():
    torch.manual_seed(0)
    model = DalleTransformer(small_config(code_pixels=12, code_pixels_head=False)).eval()
    model.set_code_pixels(torch.rand(40, 12) * 2 - 1)
    assert model.code_pixel_out is None and torch.equal(model._image_head_weight(), model.image_head.weight)
    assert not torch.allclose(model._image_input_table(), model.image_embedding.weight)
    text, image = random_batch(model.config)
    x = torch.randn(2, 5, model.config.dim)
    torch.testing.assert_close(model._image_logits(x), model.image_head(x))
    assert_image_tokens_are_causal(model, text, image)
    for bad in (dict(code_pixels=0), dict(code_pixels=12, tie_embeddings=True)):
        with pytest.raises(ValueError, match="code_pixels_head=False has no effect unless code_pixels > 0"):
            small_config(code_pixels_head=False, **bad)
