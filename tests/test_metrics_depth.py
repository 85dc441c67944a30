import math

import pytest
import torch

from trp.metrics import DEPTH_METRIC_NAMES, DepthMetric, depth_metrics


def test_hand_computed_values():
    target = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # the 0 pixel is invalid
    pred = torch.tensor([[[1.0, 3.0], [2.0, 7.0]]])
    m = depth_metrics(pred, target)
    assert list(m) == list(DEPTH_METRIC_NAMES)
    assert m["AbsRel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert m["RMSE"] == pytest.approx(math.sqrt((0 + 1 + 4) / 3))
    # ratios max(p/g, g/p) = 1, 1.5, 2
    assert m["delta1"] == pytest.approx(1 / 3)
    assert m["delta2"] == pytest.approx(2 / 3)  # 1.5 < 1.5625
    assert m["delta3"] == pytest.approx(2 / 3)  # 2 >= 1.953125


def test_average_over_images_valid_mask_and_clamping():
    target = torch.full((2, 1, 2, 2), 2.0)
    pred = torch.full((2, 1, 2, 2), 2.0)
    pred[1] = 4.0  # image 1: AbsRel 1, RMSE 2
    m = depth_metrics(pred, target)
    assert m["AbsRel"] == pytest.approx(0.5)
    assert m["RMSE"] == pytest.approx(1.0)
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[1] = False  # image 1 skipped entirely
    assert depth_metrics(pred, target, valid)["RMSE"] == 0.0
    negative = torch.full((1, 2, 2), -1.0)  # clamped to min_depth = 1e-3
    assert depth_metrics(negative, torch.ones(1, 2, 2))["AbsRel"] == pytest.approx(0.999)


def test_stateful_metric_matches_the_function():
    g = torch.rand(4, 8, 8) + 0.5
    p = g * (1 + 0.3 * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))).abs()
    metric = DepthMetric()
    metric.update(p[:1], g[:1])
    metric.update(p[1:], g[1:])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx(depth_metrics(p, g))
    with pytest.warns(UserWarning, match="before the ``update``"):  # NaN, documented
        assert math.isnan(float(DepthMetric().compute()["AbsRel"]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        depth_metrics(torch.ones(1, 2, 2), torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="no valid pixel"):
        depth_metrics(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        depth_metrics(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        depth_metrics(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="min_depth"):
        DepthMetric(min_depth=0.0)
