import math

import pytest
import torch

from trp.metrics import RESMetric, mask_intersection_union, res_metrics


def _masks():
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    target[0, :2] = True  # 8 px
    pred[0, :1] = True  # 4 px inside: IoU 4 / 8
    target[1, :, :1] = True  # 4 px
    pred[1, :, :2] = True  # 8 px covering it: IoU 4 / 8... then 2 with no overlap
    target[2, 0, 0] = True  # 1 px
    pred[2, 3, 3] = True  # 1 px elsewhere: IoU 0
    return pred, target


def test_hand_computed_ciou_and_giou():
    pred, target = _masks()
    inter, union = mask_intersection_union(pred, target)
    assert inter.tolist() == [4, 4, 0]
    assert union.tolist() == [8, 8, 2]
    m = res_metrics(pred, target)
    assert m["cIoU"] == pytest.approx(8 / 18)  # total intersection / total union
    assert m["gIoU"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # mean of per-sample IoU


def test_empty_pairs_count_as_perfect_and_integer_masks_work():
    empty = torch.zeros(1, 3, 3, dtype=torch.uint8)
    assert res_metrics(empty, empty) == {"cIoU": 1.0, "gIoU": 1.0}
    pred, target = _masks()
    m = res_metrics(pred[0].long(), target[0].long())  # a single [H, W] pair
    assert m == {"cIoU": 0.5, "gIoU": 0.5}


def test_stateful_metric_with_changing_sizes():
    pred, target = _masks()
    metric = RESMetric()
    metric.update(pred[:2], target[:2])
    big_p = torch.zeros(1, 10, 10, dtype=torch.bool)
    big_t = torch.ones(1, 10, 10, dtype=torch.bool)
    big_p[0, :5] = True
    metric.update(big_p, big_t)
    out = metric.compute()
    assert float(out["cIoU"]) == pytest.approx((8 + 50) / (16 + 100))
    assert float(out["gIoU"]) == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="before the ``update``"):  # NaN, documented
        assert all(math.isnan(float(v)) for v in RESMetric().compute().values())


def test_bad_inputs_raise():
    pred, target = _masks()
    with pytest.raises(TypeError, match="threshold"):
        res_metrics(pred.float(), target)
    with pytest.raises(ValueError, match="shapes differ"):
        res_metrics(pred[:2], target)
    with pytest.raises(ValueError, match="at least one"):
        res_metrics(pred[:0], target[:0])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        RESMetric().update(pred[None], target[None])
