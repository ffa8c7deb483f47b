"""KV-cache sampling: agreement with full forwards, guidance, determinism, filters, rerank."""
import pytest
import torch

from dalle_proto.attention_masks import ATTENTION_MODES
from dalle_proto.sampling import (filter_logits, generate_image_tokens, generate_image_tokens_with_logits,
                                  guidance_scales)
from dalle_proto.transformer import DalleTransformer, TransformerConfig


def make_model(attention="sparse", seed=0, **overrides) -> DalleTransformer:
    torch.manual_seed(seed)
    values = dict(text_vocab_size=50, text_len=5, image_vocab_size=40, image_grid=4, dim=32, depth=3,
                  heads=2, head_dim=16, conv_kernel=3, attention=attention)
    model = DalleTransformer(TransformerConfig(**{**values, **overrides})).eval()
    # larger-than-init weights so that logits differ clearly between positions and texts
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


# The KV cache runs other matmul shapes than a full forward (one query row per step against T + N
# rows at once, baddbmm against SDPA), and a batch of 1 others than a batch of 4, so CPU kernels
# round differently (by batch shape, thread count, ISA): logits agree to rounding, not bit for bit.
# Measured: at most 5e-6 (guided, AMD EPYC, 1 and 2 threads); a wrong mask, a stale cache slot or
# an off-by-one position moves them by 0.3 or more. 1e-4 sits between the two.
LOGITS_ATOL = 1e-4
# No two best logits closer than this: rounding (< LOGITS_ATOL) cannot flip an argmax, so greedy
# tokens are compared exactly across shapes. The fixtures' smallest gap is 0.02.
ARGMAX_GAP = 1e-3


def top2_gap(logits: torch.Tensor) -> float:
    """The smallest gap between the best and second-best logit over all positions."""
    best = logits.topk(2, dim=-1).values  # (..., 2)
    return float((best[..., 0] - best[..., 1]).min())


def text_batch(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.text_vocab_size, (batch, model.config.text_len), generator=g)


@pytest.mark.parametrize("attention", ATTENTION_MODES)
def test_kv_cache_logits_equal_full_forward(attention):
    model = make_model(attention)
    text = text_batch(model)
    tokens, logits = generate_image_tokens_with_logits(model, text, seed=0)
    assert tokens.shape == (2, 4, 4)
    with torch.no_grad():
        _, full = model(text, tokens.flatten(1))  # (B, N, Vi)
    torch.testing.assert_close(logits, full, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("attention,encoder,pixels", [("sparse", 0, 0), ("full", 0, 0), ("conv", 0, 0), ("sparse", 2, 0),
                                                     ("sparse", 2, 12)])
def test_kv_cache_logits_equal_full_forward_with_bidirectional_text(attention, encoder, pixels):
    model = make_model(attention, text_attention="bidirectional", text_loss_weight=0.0, text_encoder_depth=encoder,
                       code_pixels=pixels)
    if pixels:
        model.set_code_pixels(torch.rand(40, pixels, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    with torch.no_grad():  # encoder blocks start as the identity (zero residual writes): make them act
        for block in model.text_encoder:
            block.attn.out.weight.normal_(std=0.1), block.mlp.proj.weight.normal_(std=0.1)
    text = text_batch(model)
    calls = []  # the pixel MLPs run once per sampling call (frozen_image_tables), not at every token
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (model.code_pixel_in, model.code_pixel_out)] \
        if pixels else []
    for cfg_scale in (1.0, 3.0):
        calls.clear()
        tokens, logits = generate_image_tokens_with_logits(model, text, seed=0, cfg_scale=cfg_scale)
        assert len(calls) == (2 if pixels else 0) and model._frozen_tables is None
        with torch.no_grad():
            _, full = model(text, tokens.flatten(1))  # (B, N, Vi)
            _, uncond = model(model.null_text_ids(2), tokens.flatten(1))
        torch.testing.assert_close(logits, uncond + cfg_scale * (full - uncond), atol=LOGITS_ATOL, rtol=0)
    for hook in hooks:
        hook.remove()
    if encoder:  # the encoder's weights have no place in a causal-text model
        return
    causal = make_model(attention)
    causal.load_state_dict(model.state_dict())
    with torch.no_grad():  # the same weights read the caption differently: the option is not a no-op
        assert not torch.allclose(causal(text, tokens.flatten(1))[1], full, atol=1e-3)


@pytest.mark.parametrize("attention", ["sparse", "full"])
def test_kv_cache_guided_logits_equal_two_full_forwards(attention):
    model = make_model(attention)
    text = text_batch(model)
    scale = 3.0
    tokens, logits = generate_image_tokens_with_logits(model, text, cfg_scale=scale, seed=1)
    with torch.no_grad():
        _, cond = model(text, tokens.flatten(1))
        _, uncond = model(model.null_text_ids(2), tokens.flatten(1))
    torch.testing.assert_close(logits, uncond + scale * (cond - uncond), atol=LOGITS_ATOL, rtol=0)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # guidance is not a no-op here


@pytest.mark.parametrize("attention", ["sparse", "full"])
def test_kv_cache_linear_guidance_schedule_equals_two_full_forwards(attention):
    """cfg_schedule="linear": token i is drawn from uncond + s_i (cond - uncond), s_i rising from 1
    at token 0 to cfg_scale at the last, with the cached steps equal to two full forwards."""
    model = make_model(attention)
    text = text_batch(model)
    scales = guidance_scales(3.0, "linear", model.config.image_len)
    assert scales[0] == 1.0 and scales[-1] == 3.0 and scales[8] == pytest.approx(1.0 + 2.0 * 8 / 15)
    tokens, logits = generate_image_tokens_with_logits(model, text, cfg_scale=3.0, cfg_schedule="linear", seed=1)
    with torch.no_grad():
        _, cond = model(text, tokens.flatten(1))  # (B, N, Vi)
        _, uncond = model(model.null_text_ids(2), tokens.flatten(1))
    s = torch.tensor(scales).view(1, -1, 1)  # (1, N, 1)
    torch.testing.assert_close(logits, uncond + s * (cond - uncond), atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits[:, 0], cond[:, 0], atol=LOGITS_ATOL, rtol=0)  # token 0: unguided
    constant, _ = generate_image_tokens_with_logits(model, text, cfg_scale=3.0, seed=1, keep_logits=False)
    assert not torch.equal(constant, tokens)  # the schedule changes what is drawn
    assert guidance_scales(2.0, "constant", 3) == [2.0, 2.0, 2.0] and guidance_scales(2.0, "linear", 1) == [2.0]
    with pytest.raises(ValueError, match=r"cfg_schedule must be one of \('constant', 'linear'\), got 'cosine'"):
        generate_image_tokens(model, text, cfg_scale=2.0, cfg_schedule="cosine")


def test_same_seed_same_tokens_and_different_seed_different_tokens():
    model = make_model()
    text = text_batch(model, batch=3)
    a = generate_image_tokens(model, text, seed=123, top_p=0.95)
    b = generate_image_tokens(model, text, generator=torch.Generator().manual_seed(123), top_p=0.95)
    c = generate_image_tokens(model, text, seed=124, top_p=0.95)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="either generator or seed"):
        generate_image_tokens(model, text, seed=1, generator=torch.Generator())


def test_top_k_1_is_greedy_argmax_of_the_full_forward():
    model = make_model()
    text = text_batch(model)
    tokens = generate_image_tokens(model, text, top_k=1, seed=0)
    with torch.no_grad():
        _, full = model(text, tokens.flatten(1))
    assert top2_gap(full) > ARGMAX_GAP
    assert torch.equal(full.argmax(-1), tokens.flatten(1))
    assert torch.equal(generate_image_tokens(model, text, temperature=0.0), tokens)


def test_sampled_tokens_stay_in_image_vocab_and_batches_are_independent():
    model = make_model()
    text = text_batch(model, batch=4)
    tokens = generate_image_tokens(model, text, seed=5, num_images_per_text=3)
    assert tokens.shape == (12, 4, 4) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < model.config.image_vocab_size
    # greedy decoding of one caption alone equals its row within a batch: the same tokens, and logits
    # equal to rounding (a batch of 1 and a batch of 4 are different matmul shapes)
    greedy_batch, batch_logits = generate_image_tokens_with_logits(model, text, temperature=0.0)
    greedy_one, one_logits = generate_image_tokens_with_logits(model, text[2:3], temperature=0.0)
    torch.testing.assert_close(batch_logits[2:3], one_logits, atol=LOGITS_ATOL, rtol=0)
    assert top2_gap(batch_logits) > ARGMAX_GAP
    assert torch.equal(greedy_batch[2:3], greedy_one)
    assert not torch.equal(greedy_batch[1:2], greedy_one)  # the rows differ: taking the wrong row would fail


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    kept = torch.isfinite(filter_logits(logits, top_p=0.1))[0].tolist()
    assert kept == [True, False, False, False]  # the best token always survives


def test_rerank_picks_the_best_candidate_per_caption():
    model = make_model()
    text = text_batch(model, batch=2)
    k = 4
    candidates = generate_image_tokens(model, text, seed=9, num_images_per_text=k)
    calls = []

    def rerank(text_ids, image_ids):
        calls.append((text_ids.shape, image_ids.shape))
        return image_ids.flatten(1).sum(1).float()  # prefer the candidate with the largest id sum

    best = generate_image_tokens(model, text, seed=9, num_images_per_text=k, rerank=rerank)
    assert calls == [(torch.Size([8, 5]), torch.Size([8, 4, 4]))]
    assert best.shape == (2, 4, 4)
    sums = candidates.flatten(1).sum(1).view(2, k)
    for i in range(2):
        assert torch.equal(best[i], candidates[i * k + sums[i].argmax()])


def test_sampling_restores_training_mode():
    model = make_model().train()
    generate_image_tokens(model, text_batch(model), temperature=0.0)
    assert model.training
