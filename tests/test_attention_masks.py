"""The DALL·E attention masks against hand-drawn small grids (1 = may attend, [query, key])."""
import pytest
import torch

from dalle_proto.attention_masks import (MASK_KINDS, block_layout, image_lookback, image_mask,
                                         layer_attention_kinds, sequence_mask)


def literal(rows: str) -> torch.Tensor:
    return torch.tensor([[ch == "1" for ch in row] for row in rows.split()], dtype=torch.bool)


# 3x3 image grid, raster indices
#   0 1 2
#   3 4 5
#   6 7 8
ROW_3x3 = literal("""
100000000
110000000
111000000
111100000
011110000
001111000
000111100
000011110
000001111
""")  # each token sees the previous width + 1 = 4 tokens, itself included

COLUMN_3x3 = literal("""
100000000
110000000
011000000
100100000
010110000
001011000
100100100
010010110
001001011
""")  # every token above in its column, itself, and its left neighbour

# 4x4 grid, conv kernel 3: the row above (columns c-1..c+1) and the left neighbour
#    0  1  2  3
#    4  5  6  7
#    8  9 10 11
#   12 13 14 15
CONV3_4x4 = literal("""
1000000000000000
1100000000000000
0110000000000000
0011000000000000
1100100000000000
1110110000000000
0111011000000000
0011001100000000
0000110010000000
0000111011000000
0000011101100000
0000001100110000
0000000011001000
0000000011101100
0000000001110110
0000000000110011
""")

# the whole sequence for row attention: 2 text tokens then the 3x3 image
ROW_SEQUENCE_T2_3x3 = literal("""
10000000000
11000000000
11100000000
11110000000
11111000000
11111100000
11011110000
11001111000
11000111100
11000011110
11000001111
""")


def test_row_mask_matches_hand_drawn_grid():
    assert torch.equal(image_mask("row", 3), ROW_3x3)


def test_column_mask_matches_hand_drawn_grid():
    assert torch.equal(image_mask("column", 3), COLUMN_3x3)


def test_conv_mask_matches_hand_drawn_grid():
    assert torch.equal(image_mask("conv", 4, conv_kernel=3), CONV3_4x4)


def test_conv_mask_with_kernel_wider_than_grid_is_full_causal():
    assert torch.equal(image_mask("conv", 3, conv_kernel=11), torch.ones(9, 9, dtype=torch.bool).tril())


def test_full_mask_is_causal():
    assert torch.equal(image_mask("full", 3), torch.ones(9, 9, dtype=torch.bool).tril())


def test_sequence_mask_matches_hand_drawn_row_sequence():
    assert torch.equal(sequence_mask("row", text_len=2, grid=3), ROW_SEQUENCE_T2_3x3)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_sequence_mask_text_rules_are_shared_by_every_kind(kind):
    m = sequence_mask(kind, text_len=2, grid=3, conv_kernel=3)
    assert torch.equal(m[:2], ROW_SEQUENCE_T2_3x3[:2])  # text is causal and never sees the image
    assert m[2:, :2].all()  # every image token sees all text
    assert not m.triu(1).any()  # nothing ever looks ahead
    assert m.diagonal().all()  # no empty softmax row


def test_column_mask_is_row_mask_on_the_transposed_grid_restricted_to_causal():
    g = 5
    t = torch.arange(g * g).view(g, g).t().reshape(-1)  # transposed position -> raster index
    row_on_transposed = torch.zeros(g * g, g * g, dtype=torch.bool)
    row_on_transposed[t[:, None], t[None, :]] = image_mask("row", g)
    assert torch.equal(image_mask("column", g), row_on_transposed & torch.ones(g * g, g * g).tril().bool())


def test_layer_assignment_depth_8():
    assert layer_attention_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]


def test_sparse_full_widens_only_the_column_layers():
    assert layer_attention_kinds(8, "sparse_full") == ["row", "full", "row", "row", "row", "full", "row", "conv"]


def test_layer_assignment_depth_64():
    kinds = layer_attention_kinds(64)
    assert len(kinds) == 64 and kinds[-1] == "conv"
    columns = [i for i, k in enumerate(kinds, start=1) if k == "column"]
    assert columns == list(range(2, 64, 4))  # layers 2, 6, ..., 62 (1-based)
    assert kinds.count("row") == 64 - 1 - 16
    assert layer_attention_kinds(64, "full") == ["full"] * 64
    assert layer_attention_kinds(3, "conv") == ["conv"] * 3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        layer_attention_kinds(4, "axial")
    with pytest.raises(ValueError, match="unknown attention mask kind 'diag'"):
        image_mask("diag", 3)
    with pytest.raises(ValueError, match="conv_kernel must be a positive odd number, got 4"):
        image_mask("conv", 3, conv_kernel=4)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_image_lookback_covers_every_visible_key(kind):
    g = 6
    m = image_mask(kind, g, conv_kernel=5)
    q, k = m.nonzero().unbind(1)
    assert (q - k).max().item() == image_lookback(kind, g, conv_kernel=5)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_block_layout_gathers_exactly_the_sequence_mask(kind):
    t, g = 3, 5
    order, key_index, key_mask = block_layout(kind, t, g, conv_kernel=5)
    full = sequence_mask(kind, t, g, conv_kernel=5)
    rebuilt = torch.zeros_like(full)
    queries = order.view(g, g) + t  # (blocks, grid)
    for b in range(g):
        for i in range(g):
            for slot in range(key_index.shape[1]):
                if key_mask[b, i, slot]:
                    rebuilt[queries[b, i], key_index[b, slot]] = True
    assert torch.equal(rebuilt[t:], full[t:])
    assert block_layout("full", t, g) is None


def test_cache_window_holds_exactly_the_lookback():
    from dalle_proto.attention_masks import cache_window

    assert cache_window("row", 4) == 5  # grid + 1: the previous row up to straight above, and itself
    assert cache_window("conv", 4, conv_kernel=3) == 6  # one row up and one token left: 4 + 1 + 1
    assert cache_window("column", 4) == 13  # up to the top of its own column: 3 rows back + itself
    assert cache_window("full", 4) == 16  # never more than the image


def test_cache_slot_mask_is_the_sequence_mask_folded_onto_the_ring():
    from dalle_proto.attention_masks import cache_slot_mask, cache_window

    t, g = 2, 3
    slots = cache_slot_mask("row", t, g)  # (T + N, T + W) = (11, 6), W = 4
    assert slots.shape == (t + g * g, t + 4)
    # image query 5 (row 1, col 2) sees image 2..5; image j sits in slot T + j % 4: 2->4, 3->5, 4->2, 5->3
    expected = torch.tensor([1, 1, 1, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(slots[t + 5], expected)
    # image query 1 sees images 0, 1 only; slots of images 2, 3 are not written yet
    assert torch.equal(slots[t + 1], torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool))
    # text queries: causal text, no image slot
    assert torch.equal(slots[0], torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool))
    for kind in ("row", "column", "conv", "full"):  # every key the full mask allows is on the ring
        full = sequence_mask(kind, t, g, conv_kernel=3)
        ring = cache_slot_mask(kind, t, g, conv_kernel=3)
        assert ring.shape[1] == t + cache_window(kind, g, conv_kernel=3)
        assert torch.equal(ring.sum(1), full.sum(1)), kind
