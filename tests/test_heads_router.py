"""DecoderRouter: per-triplet (or all-heads) routing of LM hidden states to the unit heads as one
HeadInputs; target-token checks; VRT reference boxes from the binding; RoutedCriterion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp.heads
from tests.test_grammar_fixtures import offline_tokenizer
from trp.grammar import REF, TokenVocab, encode_text, parse_ids, vrt_base_of
from trp.heads import BoxHead, DecoderRouter, HeadInputs, RoutedPredictions, triplet_group
from trp.losses import BoxCriterion, DepthCriterion, RoutedCriterion
from trp.vrt import ImageBinding


class _Recorder(nn.Module):
    """A head that returns its inputs, to check what the router passes."""

    def forward(self, inputs: HeadInputs) -> dict:
        return {
            "queries": inputs.queries,
            "image_index": inputs.image_index,
            "object_index": inputs.object_index,
            "image_size": inputs.image_size,
            "reference_boxes": inputs.reference_boxes,
            "inputs": inputs,
        }


def _parsed(texts):
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    ids = [encode_text(tok, t) for t in texts]
    return ids, [parse_ids(i, vocab=vocab) for i in ids]


def _input_ids(ids: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(ids), max(len(i) for i in ids), dtype=torch.long)
    for row, i in enumerate(ids):
        out[row, : len(i)] = torch.tensor(i)
    return out


def _ids_of_tokens():
    tok = offline_tokenizer("bpe")
    return int(tok.convert_tokens_to_ids(REF)), vrt_base_of(tok)


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
    assert box.is_vrt.tolist() == [False, False, True] and mask.is_vrt.tolist() == [True, True]
    # One HeadInputs per unit; the former alias is gone.
    assert isinstance(box.predictions["inputs"], HeadInputs)
    assert not hasattr(trp.heads, "UnitRouter")


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


def test_route_all_sends_every_target_to_every_head():
    ids, results = _parsed(TEXTS)
    hidden = torch.randn(2, max(len(i) for i in ids), 8)
    router = DecoderRouter({"box": _Recorder(), "mask": _Recorder()}, route="all", shift=0)
    out = router(results, hidden, [torch.randn(2, 4, 2, 2)])
    box, mask = out["box"], out["mask"]
    # Answer order: sample 0's box triplet (2 REFs), its mask triplet (2 VRT runs), then
    # sample 1's depth <REF> and box VRT — the depth unit has no head but is decoded anyway.
    assert box.sample.tolist() == [0, 0, 0, 0, 1, 1]
    assert box.triplet.tolist() == [0, 0, 1, 1, 0, 1]
    assert box.instance.tolist() == [0, 1, 0, 1, 0, 0]
    assert box.concepts == ("dog", "dog", "cat", "cat", "sky", "car")
    assert box.is_vrt.tolist() == [False, False, True, True, False, True]
    assert box.predictions["object_index"].tolist() == [0, 1, 2, 2, 3, 4, 5]
    # Both heads get the very same inputs object.
    assert box.predictions["inputs"] is mask.predictions["inputs"]
    assert torch.equal(box.group, mask.group)
    with pytest.raises(ValueError, match="route"):
        DecoderRouter({"box": _Recorder()}, route="some")


def test_wrong_positions_raise_naming_sample_and_position():
    """Positions read against the tokens: off by the prompt length they hit other tokens."""
    ids, results = _parsed(TEXTS)
    input_ids = _input_ids(ids)
    ref_id, vrt_base = _ids_of_tokens()
    hidden = torch.randn(2, input_ids.shape[1] + 5, 8)
    heads = {u: _Recorder() for u in ("box", "mask", "depth", "keypoint")}
    router = DecoderRouter(heads, ref_id=ref_id, vrt_base=vrt_base)
    padded = torch.cat([input_ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    router(results, hidden, [torch.randn(2, 4, 2, 2)], input_ids=padded)  # the right columns
    # The same answers placed after a 5-token prompt, positions not shifted.
    shifted = torch.cat([torch.full((2, 5), 7, dtype=torch.long), input_ids], 1)
    with pytest.raises(ValueError, match=r"sample 0: target token at position \d+ should be"):
        router(results, hidden, [torch.randn(2, 4, 2, 2)], input_ids=shifted)
    with pytest.raises(ValueError, match="input_ids must be"):
        router(results, hidden, [torch.randn(2, 4, 2, 2)], input_ids=input_ids)
    with pytest.raises(TypeError, match="ref_id"):
        DecoderRouter(heads, ref_id="<REF>")


def test_binding_gives_vrt_runs_their_reference_box_and_image():
    """Sample 0 has two images (4 x 4, then 2 x 3); sample 1 one 3 x 3 image. A run's box
    covers its first patch and the patches connected to it, in its own image's grid."""
    ref_id, vrt_base = _ids_of_tokens()
    texts = [
        # VRT 5 = (1, 1) and 6 = (1, 2) of the 4 x 4 image; 15 = (3, 3) is not connected.
        "<Phrase>a</Phrase>(<Unit>box</Unit><|VRT_5|><|VRT_6|><|VRT_15|>, [1]<REF>), "
        # VRT 16 + 4 = (1, 1) of the 2 x 3 image of sample 0.
        "<Phrase>b</Phrase>(<Unit>box</Unit><|VRT_20|>).",
        "<Phrase>c</Phrase>(<Unit>box</Unit><|VRT_0|><|VRT_4|>).",
    ]
    ids, results = _parsed(texts)
    input_ids = _input_ids(ids)
    hidden = torch.randn(2, input_ids.shape[1], 8)
    binding = ImageBinding.from_grids([[4, 4], [2, 3], [3, 3]], [2, 1], vrt_base=vrt_base)
    router = DecoderRouter({"box": _Recorder()}, ref_id=ref_id)
    out = router(results, hidden, [torch.randn(3, 4, 4, 4)], input_ids=input_ids, binding=binding)[
        "box"
    ]
    refs = out.predictions["reference_boxes"]
    expected = torch.tensor(
        [
            [0.5, 0.375, 0.5, 0.25],  # cols 1-2, row 1 of 4 x 4
            [float("nan")] * 4,
            [0.5, 0.75, 1 / 3, 0.5],  # col 1, row 1 of 2 x 3
            [1 / 3, 1 / 3, 2 / 3, 2 / 3],  # (0, 0) and (1, 1) of 3 x 3
        ]
    )
    torch.testing.assert_close(refs, expected, equal_nan=True)
    # Each object's image: the first patch's image; the <REF> its sample's first image.
    images = out.predictions["image_index"]
    obj = out.predictions["object_index"]
    per_object = torch.zeros(4, dtype=torch.long).scatter(0, obj, images)
    assert per_object.tolist() == [0, 0, 1, 2]


def test_run_reference_boxes_directly():
    from trp.vrt.targets import run_reference_boxes

    binding = ImageBinding.from_grids([[2, 6]], [1], vrt_base=100)
    ids = torch.tensor([[1, 100 + 1, 100 + 8, 100 + 5, 7]])
    pos = torch.tensor([[1, 2, 3], [4, -1, -1]])
    boxes = run_reference_boxes(ids, torch.tensor([0, 0]), pos, binding)
    # (0, 1) and (1, 2) are 8-connected; (0, 5) is not connected to them.
    torch.testing.assert_close(boxes[0], torch.tensor([1 / 3, 0.5, 1 / 3, 1.0]))
    assert boxes[1].isnan().all()
    with pytest.raises(ValueError, match="positions"):
        run_reference_boxes(ids, torch.tensor([0]), pos, binding)


def test_routed_criterion_mirrors_the_router():
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
    routed = router(results, hidden, [torch.randn(2, 16, 6, 6)])
    group = triplet_group(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    box_targets = {"boxes": torch.rand(3, 4) * 0.5 + 0.25, "group": group}
    depth_targets = {
        "depth": torch.rand(1, 8, 8) + 0.5,
        "group": triplet_group(torch.tensor([1]), torch.tensor([0])),
    }
    criterion = RoutedCriterion({"box": BoxCriterion(), "depth": DepthCriterion()})
    depth_out = {"depth": torch.rand(1, 4, 4) + 0.5}
    routed["depth"] = RoutedPredictions(**{**routed["depth"].__dict__, "predictions": depth_out})
    losses = criterion(
        {"box": routed["box"], "depth": routed["depth"], "keypoint": routed["keypoint"]},
        {"box": box_targets, "depth": depth_targets},
    )
    direct = BoxCriterion()(routed["box"].predictions, box_targets, pred_group=routed["box"].group)
    assert {k for k in losses if k.startswith("box/")} == {f"box/{k}" for k in direct}
    for k, v in direct.items():
        torch.testing.assert_close(losses[f"box/{k}"], v)
    assert {"depth/loss_silog", "depth/loss_grad"} <= set(losses)
    assert not any(k.startswith("keypoint/") for k in losses)  # nothing to decode: skipped
    sum(losses.values()).backward()
    assert hidden.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="no targets"):
        criterion({"box": routed["box"]}, {})
    with pytest.raises(KeyError, match="no criterion"):
        RoutedCriterion({"box": BoxCriterion()})({"depth": routed["depth"]}, {"depth": {}})
