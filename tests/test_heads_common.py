"""Shared head plumbing: FeatureAdapter, sine-cosine positions, QueryEncoder, PixelDecoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trp.heads import FeatureAdapter, PixelDecoder, QueryEncoder, quarter_size
from trp.heads.blocks import sine_position_embedding


def test_sine_positions_are_distinct_and_resolution_consistent():
    pos = sine_position_embedding(6, 8, 32)
    assert pos.shape == (32, 6, 8)
    flat = pos.flatten(1).T
    assert torch.cdist(flat, flat).add(torch.eye(48) * 10).min() > 1e-3
    # The same normalised location on two grids gets the same code: cell centre 1.5/6 = 0.5/2.
    fine = sine_position_embedding(6, 6, 32)
    coarse = sine_position_embedding(2, 2, 32)
    torch.testing.assert_close(fine[:, 1, 1], coarse[:, 0, 0])
    assert not torch.allclose(fine[:, 0, 0], coarse[:, 0, 0])
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_embedding(2, 2, 30)


def test_feature_adapter_flattens_levels():
    adapter = FeatureAdapter(in_channels=[8, 16], d_model=32)
    out = adapter([torch.randn(2, 8, 6, 4), torch.randn(2, 16, 3, 2)])
    assert out.flat.shape == (2, 30, 32)
    assert out.flat_pos.shape == (30, 32)
    assert out.spatial_shapes.tolist() == [[6, 4], [3, 2]]
    assert out.level_start_index.tolist() == [0, 24]
    torch.testing.assert_close(out.flat[:, 24:].transpose(1, 2).reshape(2, 32, 3, 2), out.maps[1])
    with pytest.raises(TypeError, match="list"):
        adapter(torch.randn(2, 8, 6, 4))
    with pytest.raises(ValueError, match="batch size"):
        adapter([torch.randn(2, 8, 6, 4), torch.randn(3, 16, 3, 2)])


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_query_encoder_pools_and_slots(pooling):
    torch.manual_seed(0)
    enc = QueryEncoder(in_dim=8, d_model=16, pooling=pooling, max_queries=2)
    q = torch.randn(5, 8)
    qb = enc(
        q, torch.tensor([1, 1, 0, 1, 1]), num_images=3, object_index=torch.tensor([0, 0, 1, 2, 3])
    )
    assert len(qb) == 4
    assert qb.image_index.tolist() == [1, 0, 1, 1]
    assert qb.slot.tolist() == [0, 0, 1, 2]
    assert qb.max_per_image == 3
    # Slot 2 exceeds max_queries - 1 and reuses the last position embedding.
    torch.testing.assert_close(qb.pos[3], enc.query_pos.weight[1])
    projected = enc.proj(q)
    if pooling == "mean":
        torch.testing.assert_close(qb.embed[0], projected[:2].mean(0))
    else:  # a convex combination of the object's two tokens
        w = (qb.embed[0] - projected[1]) / (projected[0] - projected[1])
        assert 0 < w.median() < 1
    torch.testing.assert_close(qb.embed[1], projected[2])
    padded = qb.pad(qb.embed)
    assert padded.shape == (3, 3, 16)
    assert padded[2].abs().sum() == 0  # image 2 has no object
    torch.testing.assert_close(qb.unpad(padded), qb.embed)
    mask = qb.attention_padding_mask()
    assert not mask[:, 0].any()
    assert mask[0].tolist() == [False, True, True]


def test_pixel_decoder_output_grid():
    dec = PixelDecoder(d_model=16, out_dim=8, num_levels=2)
    out = dec([torch.randn(2, 16, 3, 3), torch.randn(2, 16, 6, 6)], quarter_size((50, 22)))
    assert out.shape == (2, 8, 13, 6)
    with pytest.raises(ValueError, match="image_size"):
        quarter_size((0, 5))


def test_jitter_boxes_moves_within_the_scale_and_keeps_nan_rows() -> None:
    from trp.heads import jitter_boxes

    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [float("nan")] * 4]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    out = jitter_boxes(boxes, 0.4, generator=gen)
    assert out[1::2].isnan().all()
    real = out[0::2]
    assert (real[:, 2] >= 0.2 * 0.6 - 1e-6).all() and (real[:, 2] <= 0.2 * 1.4 + 1e-6).all()
    assert ((real[:, 0] - 0.5).abs() <= 0.2 * 0.2 + 1e-6).all()
    assert real.std(0).min() > 0  # it does move
    assert jitter_boxes(boxes, 0.0) is boxes
    again = jitter_boxes(boxes, 0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out, equal_nan=True)
    with pytest.raises(ValueError, match="scale"):
        jitter_boxes(boxes, -1.0)


def test_head_inputs_validate_and_replace() -> None:
    from trp.heads import HeadInputs

    feats = [torch.randn(2, 4, 3, 3)]
    q = torch.randn(3, 8)
    idx = torch.tensor([0, 1, 1])
    inputs = HeadInputs(queries=q, features=feats, image_index=idx, image_size=(12, 12))
    assert inputs.num_images == 2 and inputs.object_index is None
    assert inputs.replace(image_size=(6, 6)).image_size == (6, 6) and inputs.image_size == (12, 12)
    with pytest.raises(TypeError, match="image_index must be an int64"):
        HeadInputs(queries=q, features=feats, image_index=idx.int())
    with pytest.raises(ValueError, match=r"object_index must have shape \[3\]"):
        HeadInputs(queries=q, features=feats, image_index=idx, object_index=idx[:2])
    with pytest.raises(TypeError, match="not a Tensor"):
        HeadInputs(queries=q, features=feats[0], image_index=idx)
    with pytest.raises(ValueError, match="reference_boxes"):
        HeadInputs(queries=q, features=feats, image_index=idx, reference_boxes=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="fine_features"):
        HeadInputs(
            queries=q, features=feats, image_index=idx, fine_features=torch.zeros(3, 1, 2, 2)
        )
    with pytest.raises(ValueError, match="image_size"):
        HeadInputs(queries=q, features=feats, image_index=idx, image_size=(0, 4))


def test_decoder_layer_options_and_dense_key_padding() -> None:
    """Dense cross-attention ignores padded cells: junk there does not reach the tokens."""
    from trp.heads import DenseCrossAttention, QueryDecoderLayer

    torch.manual_seed(0)
    adapter = FeatureAdapter(in_channels=[8], d_model=16)
    layer = QueryDecoderLayer(
        d_model=16,
        n_heads=2,
        dim_feedforward=32,
        cross_attention=DenseCrossAttention(d_model=16, n_heads=2),
        norm_first=True,
        activation="gelu",
    ).eval()
    image = torch.randn(1, 8, 3, 3)
    big = torch.randn(1, 8, 5, 5) * 5
    big[:, :, :3, :3] = image
    mask = torch.ones(1, 5, 5, dtype=torch.bool)
    mask[:, :3, :3] = False
    tokens = torch.randn(1, 2, 1, 16)
    alone = layer(tokens, adapter([image]))
    padded = layer(tokens, adapter([big], [mask]))
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert (layer(tokens, adapter([big])) - alone).abs().max() > 1e-3
    with pytest.raises(ValueError, match="self_attention"):
        QueryDecoderLayer(
            d_model=16,
            n_heads=2,
            dim_feedforward=8,
            cross_attention=nn.Identity(),
            self_attention="image",
        )
    with pytest.raises(ValueError, match="activation"):
        QueryDecoderLayer(
            d_model=16,
            n_heads=2,
            dim_feedforward=8,
            cross_attention=nn.Identity(),
            activation="tanh",
        )
