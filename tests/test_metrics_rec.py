import math

import pytest
import torch

from trp.metrics import REC_METRIC_NAMES, RECMetric, center_in_box, paired_box_iou, rec_metrics

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
PRED = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],  # IoU 1, centre inside
    [5.0, 0.0, 15.0, 10.0],  # IoU 50 / 150 = 1/3, centre (10, 5) on the border: inside
    [5.0, 5.0, 9.0, 9.0],  # IoU 0, centre outside
])


def test_hand_computed_values():
    iou = paired_box_iou(PRED, GT)
    assert iou.tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert center_in_box(PRED, GT).tolist() == [True, True, False]
    m = rec_metrics(PRED, GT)
    assert list(m) == list(REC_METRIC_NAMES)
    assert m["IoU"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["ACC@0.1"] == pytest.approx(2 / 3)
    assert m["ACC@0.3"] == pytest.approx(2 / 3)
    assert m["ACC@0.5"] == pytest.approx(1 / 3)
    assert m["ACC@0.9"] == pytest.approx(1 / 3)
    assert m["Center_ACC"] == pytest.approx(2 / 3)


def test_threshold_is_inclusive_and_degenerate_boxes():
    # IoU exactly 0.5: 10x10 GT, 10x5 prediction inside it.
    m = rec_metrics(torch.tensor([[0.0, 0.0, 10.0, 5.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert m["ACC@0.5"] == 1.0
    assert m["ACC@0.7"] == 0.0
    # Inverted / empty boxes: no area, IoU 0 instead of a division by zero.
    iou = paired_box_iou(torch.tensor([[5.0, 5.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]),
                         torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 2.0, 2.0]]))
    assert iou.tolist() == [0.0, 0.0]


def test_stateful_metric_accumulates_like_the_function():
    metric = RECMetric()
    metric.update(PRED[:2], GT[:2])
    metric.update(PRED[2:], GT[2:])
    metric.update(torch.zeros(0, 4), torch.zeros(0, 4))  # an empty batch changes nothing
    out = metric.compute()
    expected = rec_metrics(PRED, GT)
    assert {k: float(v) for k, v in out.items()} == pytest.approx(expected)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # NaN, documented
        assert math.isnan(float(RECMetric().compute()["IoU"]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        rec_metrics(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="2 predicted boxes for 3"):
        rec_metrics(PRED[:2], GT)
    with pytest.raises(ValueError, match="at least one"):
        rec_metrics(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        RECMetric().update(torch.full((1, 4), float("nan")), GT[:1])
    with pytest.raises(TypeError):
        rec_metrics([[0, 0, 1, 1]], GT[:1])
