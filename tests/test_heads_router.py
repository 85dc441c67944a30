"""DecoderRouter: per-triplet routing of LM hidden states to the unit heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_grammar_fixtures import offline_tokenizer
from trp.grammar import TokenVocab, encode_text, parse_ids
from trp.heads import BoxHead, DecoderRouter, UnitRouter, triplet_group
from trp.losses import BoxCriterion


class _Recorder(nn.Module):
    """A head that returns its inputs, to check what the router passes."""

    def forward(self, queries, features, query_image_index, *, object_index=None, image_size=None):
        return {
            "queries": queries,
            "image_index": query_image_index,
            "object_index": object_index,
            "image_size": image_size,
        }


def _parsed(texts):
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    ids = [encode_text(tok, t) for t in texts]
    return ids, [parse_ids(i, vocab=vocab) for i in ids]


TEXTS = [
    "<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>) and "
    "<Phrase>cat</Phrase>(<Unit>mask</Unit><|VRT_3|><|VRT_4|>, <|VRT_9|>).",
    "<Phrase>sky</Phrase>(<Unit>depth</Unit>[0]<REF>), "
    "<Phrase>car</Phrase>(<Unit>box</Unit><|VRT_1|>).",
]


@pytest.mark.parametrize("shift", [0, 1])
def test_each_head_gets_exactly_its_queries(shift):
    ids, results = _parsed(TEXTS)
    hidden = torch.randn(2, max(len(i) for i in ids), 8)
    router = DecoderRouter(
        {u: _Recorder() for u in ("box", "mask", "depth", "keypoint")}, shift=shift
    )
    feats = [torch.randn(3, 4, 2, 2)]
    out = router(results, hidden, feats, image_index=torch.tensor([2, 0]), image_size=(8, 8))
    box, mask, depth, kp = (out[u] for u in ("box", "mask", "depth", "keypoint"))
    assert box.sample.tolist() == [0, 0, 1]
    assert box.triplet.tolist() == [0, 0, 1]
    assert box.instance.tolist() == [0, 1, 0]
    assert box.group.tolist() == triplet_group(box.sample, box.triplet).tolist()
    assert box.group[0] == box.group[1] != box.group[2]
    pos = [p[0] for p in results[0].positions[0]] + [results[1].positions[1][0][0] - shift]
    expected = torch.stack([hidden[0, pos[0]], hidden[0, pos[1]], hidden[1, pos[2]]])
    # A mixed unit (REF + VRT) has runs of length 1 only: no pooling needed.
    torch.testing.assert_close(box.predictions["queries"], expected)
    assert box.predictions["image_index"].tolist() == [2, 2, 0]
    assert box.predictions["object_index"] is None
    # Mask: a run of 2 VRTs and a run of 1 -> 3 token queries, 2 objects.
    m_pos = [p - shift for run in results[0].positions[1] for p in run]
    torch.testing.assert_close(mask.predictions["queries"], hidden[0, m_pos])
    assert mask.predictions["object_index"].tolist() == [0, 0, 1]
    assert mask.concepts == ("cat", "cat")
    assert len(mask) == 2
    assert depth.sample.tolist() == [1]
    assert depth.predictions["image_size"] == (8, 8)
    assert len(kp) == 0
    assert kp.predictions["queries"].shape == (0, 8)
    assert UnitRouter is DecoderRouter


def test_real_head_trains_through_router():
    ids, results = _parsed(TEXTS)
    hidden = torch.randn(2, max(len(i) for i in ids), 48, requires_grad=True)
    torch.manual_seed(0)
    head = BoxHead(
        in_dim=48,
        in_channels=[16],
        d_model=32,
        n_heads=4,
        n_points=2,
        dim_feedforward=64,
        num_layers=2,
    )
    router = DecoderRouter(
        {"box": head, "mask": _Recorder(), "depth": _Recorder(), "keypoint": _Recorder()}
    )
    out = router(results, hidden, [torch.randn(2, 16, 6, 6)])["box"]
    assert out.predictions["boxes"].shape == (3, 4)
    targets = {
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]),
        "group": triplet_group(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1])),
    }
    losses = BoxCriterion()(out.predictions, targets, pred_group=out.group)
    sum(losses.values()).backward()
    assert hidden.grad[0].abs().sum() > 0
    assert hidden.grad[1].abs().sum() > 0


def test_bad_inputs():
    ids, results = _parsed(TEXTS)
    hidden = torch.randn(2, max(len(i) for i in ids), 8)
    heads = {u: _Recorder() for u in ("box", "mask", "depth", "keypoint")}
    router = DecoderRouter(heads)
    with pytest.raises(ValueError, match="parse results"):
        router(results[:1], hidden, [])
    with pytest.raises(ValueError, match="positions"):
        router(results, hidden[:, :3], [])
    with pytest.raises(ValueError, match="image_index"):
        router(results, hidden, [], image_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="has no head"):
        DecoderRouter({"box": _Recorder()})(results, hidden, [])
    with pytest.raises(ValueError, match="shift"):
        DecoderRouter(heads, shift=2)
