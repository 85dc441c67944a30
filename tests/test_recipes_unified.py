"""The unified recipe's pieces: per-task overlays (keypoints, depth maps, prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trp.data import UnifiedShapesDataset
from trp.recipes.overlays import (
    DEPTH_COLORMAP,
    GT_COLOR,
    PRED_COLOR,
    PROMPT_COLOR,
    depth_to_rgb,
    draw_overlay,
    draw_task_overlay,
)


def test_depth_colour_map_uses_one_range_and_the_map_ends() -> None:
    d = torch.tensor([[2.0, 5.0], [8.0, float("nan")]])
    rgb = depth_to_rgb(d)
    assert tuple(rgb[0, 0]) == DEPTH_COLORMAP[0] and tuple(rgb[1, 0]) == DEPTH_COLORMAP[-1]
    assert tuple(rgb[1, 1]) == (0, 0, 0)
    fixed = depth_to_rgb(d, vmin=0.0, vmax=16.0)
    assert tuple(fixed[0, 0]) != DEPTH_COLORMAP[0]  # 2 of [0, 16] is not the near end
    with pytest.raises(ValueError, match="H, W"):
        depth_to_rgb(torch.zeros(1, 2, 2))


def test_depth_overlay_puts_prediction_and_ground_truth_beside_the_image() -> None:
    image = torch.full((3, 8, 10), 0.5)
    gt = torch.full((8, 10), 10.0)
    gt[2:5, 2:5] = 2.0
    pred = gt.clone()
    pred[2:5, 2:5] = 10.0  # misses the near shape
    img = np.asarray(draw_overlay(image, depth=pred, target_depth=gt, scale=1))
    assert img.shape == (8, 30, 3)
    assert tuple(img[3, 23]) == DEPTH_COLORMAP[0]  # ground truth: near
    assert tuple(img[3, 13]) == DEPTH_COLORMAP[-1]  # prediction: far (one shared range)
    assert tuple(img[0, 0]) == (128, 128, 128)


def test_keypoints_drawn_and_task_overlays_for_every_task() -> None:
    ds = UnifiedShapesDataset(num_samples=80, seed=5, empty_image_prob=0.0, negative_prob=0.0)
    by_task: dict[str, dict] = {}
    for i in range(80):
        s = ds[i]
        by_task.setdefault(s["task"], s)
    s = by_task["keypoints"]
    pred = s["keypoints"].clone()
    pred[..., :2] += 3.0
    img = np.asarray(draw_task_overlay(s, {"text": s["answer"], "keypoints": pred}, scale=3))
    vis = s["keypoints"][s["keypoints"][..., 2] == 2]
    x, y = (int(v * 3) for v in vis[0, :2].tolist())
    assert tuple(img[y, x]) == GT_COLOR
    x, y = (int(v * 3) for v in (vis[0, :2] + 3).tolist())
    assert tuple(img[y, x]) == PRED_COLOR
    for task, sample in by_task.items():
        out = draw_task_overlay(sample, None)
        width = 128 * 3 * (2 if task == "depth" else 1)  # no prediction: the GT map only
        assert out.width == width and out.height > 128 * 3, task
    rc = by_task["region_caption"]
    img = np.asarray(draw_task_overlay(rc, {"text": rc["reference"]}, scale=1)).astype(int)
    ys, xs = np.nonzero(rc["prompt_mask"].numpy())
    expected = (rc["image"][:, ys[0], xs[0]] * 255).round().numpy() * 0.5 + np.array(
        PROMPT_COLOR
    ) * 0.5
    assert np.abs(img[ys[0], xs[0]] - expected).max() <= 1
    with pytest.raises(KeyError, match="task"):
        draw_task_overlay({"image": rc["image"]}, None)
    with pytest.raises(ValueError, match="boxes"):
        draw_overlay(rc["image"], box=torch.zeros(2, 3))
