"""RoutedCriterion: each routed unit's criterion, "{unit}/{name}" keys, empty units skipped, and
the PaDT case (route="all": box and mask heads trained on every target)."""

from __future__ import annotations

import pytest
import torch

from trp.heads import BoxHead, HeadInputs, MaskHead, RoutedPredictions, triplet_group
from trp.losses import BoxCriterion, MaskCriterion, RoutedCriterion


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation (and stalls on a busy box).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _routed(unit: str, predictions: dict, sample: list[int], triplet: list[int]):
    s, t = torch.tensor(sample), torch.tensor(triplet)
    return RoutedPredictions(
        unit=unit,
        predictions=predictions,
        sample=s,
        triplet=t,
        instance=torch.zeros_like(s),
        group=triplet_group(s, t),
        concepts=("x",) * len(sample),
        is_vrt=torch.ones(len(sample), dtype=torch.bool),
    )


def test_losses_are_the_criteria_s_under_unit_keys():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.2, 0.4]])
    pred = {"boxes": boxes, "scores": torch.zeros(2), "aux": []}
    routed = {
        "box": _routed("box", pred, [0, 1], [0, 0]),
        "mask": _routed("mask", {"masks": torch.zeros(0, 4, 4)}, [], []),
    }
    tgt_boxes = boxes.flip(0).clone()
    targets = {"box": {"boxes": tgt_boxes, "group": triplet_group(*torch.tensor([[1, 0], [0, 0]]))}}
    criterion = RoutedCriterion({"box": BoxCriterion(), "mask": MaskCriterion()})
    losses = criterion(routed, targets)
    # The mask unit has nothing to decode (and no targets): skipped, not a crash.
    assert set(losses) == {"box/loss_bbox", "box/loss_giou", "box/loss_score"}
    # Groups pair each prediction with its own sample's target: a perfect match.
    assert losses["box/loss_bbox"].item() == 0 and losses["box/loss_giou"].item() == 0
    # Without groups in the targets the pairs are in order: the flipped targets cost.
    in_order = criterion({"box": routed["box"]}, {"box": {"boxes": tgt_boxes}})
    assert in_order["box/loss_bbox"] > 0.1


def test_missing_targets_or_criteria_raise():
    pred = {"boxes": torch.rand(1, 4) * 0.5 + 0.25, "scores": torch.zeros(1), "aux": []}
    routed = {"box": _routed("box", pred, [0], [0])}
    with pytest.raises(KeyError, match="no targets"):
        RoutedCriterion({"box": BoxCriterion()})(routed, {})
    with pytest.raises(KeyError, match="no criterion"):
        RoutedCriterion({"mask": MaskCriterion()})(routed, {"box": {"boxes": torch.rand(1, 4)}})
    with pytest.raises(TypeError, match="RoutedPredictions"):
        RoutedCriterion({"box": BoxCriterion()})({"box": pred}, {"box": {}})
    with pytest.raises(ValueError, match="empty"):
        RoutedCriterion({})


def test_box_and_mask_heads_train_on_every_target():
    """route="all" in miniature: the same HeadInputs through a light box head and a light mask
    head, one RoutedCriterion; 60 Adam steps (lr 3e-3) bring the summed loss below 0.7 of its
    start and both heads' parameters get gradients."""
    torch.manual_seed(0)
    kw = {
        "in_dim": 16,
        "in_channels": [24],
        "d_model": 32,
        "n_heads": 2,
        "dim_feedforward": 32,
        "num_layers": 1,
        "decoder": "light",
        "cross_attention": "dense",
        "mask_dim": 8,
    }
    heads = {"box": BoxHead(**kw), "mask": MaskHead(**kw)}
    feats = [torch.randn(2, 24, 4, 4)]
    inputs = HeadInputs(
        queries=torch.randn(2, 16),
        features=feats,
        image_index=torch.tensor([0, 1]),
        image_size=(32, 32),
    )
    boxes = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.6, 0.6, 0.4, 0.2]])
    masks = torch.zeros(2, 32, 32)
    masks[0, 5:14, 5:14] = 1
    masks[1, 16:22, 11:27] = 1
    group = triplet_group(torch.tensor([0, 1]), torch.tensor([0, 0]))
    targets = {"box": {"boxes": boxes, "group": group}, "mask": {"masks": masks, "group": group}}
    criterion = RoutedCriterion(
        {
            "box": BoxCriterion(),
            "mask": MaskCriterion(
                num_points=256, oversample_ratio=1.0, importance_sample_ratio=0.0
            ),
        }
    )
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)

    def step() -> torch.Tensor:
        routed = {u: _routed(u, h(inputs), [0, 1], [0, 0]) for u, h in heads.items()}
        return sum(criterion(routed, targets).values())

    first = step()
    first.backward()
    assert all(p.grad is not None for p in heads["mask"].readout.embed.parameters())
    assert heads["box"].box_embed[0].layers[-1].weight.grad.abs().sum() > 0
    opt.zero_grad()
    for _ in range(60):
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first.item()
