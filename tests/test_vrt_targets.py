"""Target patches from masks and boxes, sampling modes and robust exclusions."""

from __future__ import annotations

import pytest
import torch

from trp.vrt import (
    box_coverage,
    mask_coverage,
    rasterize_box,
    robust_exclusions,
    sample_target_patches,
    target_patches,
)


def test_box_coverage_exact():
    cov = box_coverage([0.25, 0.0, 0.5, 0.5], (2, 4))
    assert cov.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    cov = box_coverage([0.1, 0.1, 0.6, 0.6], (2, 2))
    torch.testing.assert_close(cov, torch.tensor([[0.64, 0.16], [0.16, 0.04]]))


def test_box_threshold_matches_rasterised_mask():
    box = [0.13, 0.27, 0.71, 0.66]
    exact = target_patches(box_coverage(box, (7, 9)))
    raster = target_patches(mask_coverage(rasterize_box(box, (700, 900)), (7, 9)))
    assert exact.tolist() == raster.tolist()


def test_threshold_1_over_28():
    mask = torch.zeros(28, 56, dtype=torch.bool)
    mask[0, 0] = True  # 1/784 of cell (0, 0): below 1/28
    mask[0:2, 28 : 28 + 14] = True  # 28/784 = 1/28 of cell (0, 1): not more than the threshold
    mask[0:2, 28 + 14] = True  # now 30/784 > 1/28
    cov = mask_coverage(mask, (1, 2))
    assert target_patches(cov).tolist() == [1]
    only_tiny = torch.zeros(28, 28, dtype=torch.bool)
    only_tiny[3, 3] = True
    assert target_patches(mask_coverage(only_tiny, (1, 1))).tolist() == [0]  # fallback
    assert target_patches(torch.zeros(2, 2)).numel() == 0


def test_sampling_modes_deterministic():
    patches = torch.arange(10, 30)
    grid = (5, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_target_patches(patches, grid, num=5, mode="random", generator=g1)
    b = sample_target_patches(patches, grid, num=5, mode="random", generator=g2)
    assert torch.equal(a, b)
    assert a.unique().numel() == 5
    assert bool((a[1:] > a[:-1]).all())
    assert set(a.tolist()) <= set(patches.tolist())
    few = torch.tensor([3, 4])
    assert sample_target_patches(few, grid, num=5, mode="random").tolist() == [3, 4]
    rep = sample_target_patches(few, grid, num=5, mode="padt", generator=g1)
    assert rep.numel() == 5
    assert set(rep.tolist()) <= {3, 4}
    assert sample_target_patches(patches, grid, num=5, mode="padt").unique().numel() == 5
    assert sample_target_patches(patches, grid, mode="all").tolist() == patches.tolist()
    other = torch.Generator().manual_seed(4)
    draws = {
        tuple(sample_target_patches(patches, grid, generator=other).tolist()) for _ in range(5)
    }
    assert len(draws) > 1


def test_extremes():
    # a plus shape on an 5x5 grid: centre (2,2), extremes left (2,0), right (2,4), top, bottom
    rows = torch.tensor([0, 1, 2, 2, 2, 2, 2, 3, 4])
    cols = torch.tensor([2, 2, 0, 1, 2, 3, 4, 2, 2])
    patches = rows * 5 + cols
    out = sample_target_patches(patches, (5, 5), mode="extremes")
    assert out.tolist() == [12, 10, 14, 2, 22]


def test_bad_inputs():
    with pytest.raises(ValueError, match="no target"):
        sample_target_patches(torch.zeros(0, dtype=torch.long), (2, 2))
    with pytest.raises(ValueError, match="mode"):
        sample_target_patches(torch.tensor([1]), (2, 2), mode="nope")
    with pytest.raises(ValueError, match="grid"):
        mask_coverage(torch.ones(4, 4), (0, 2))
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_coverage([0.5, 0.0, 0.1, 1.0], (2, 2))


def test_robust_exclusions():
    base = 100
    labels = torch.tensor([-100, base + 3, base + 5, 7, base + 1])
    offsets, ids = robust_exclusions(
        labels, [([1, 2], torch.tensor([3, 5, 6])), ([4], torch.tensor([1]))], vrt_base=base
    )
    assert offsets.tolist() == [0, 0, 2, 4, 4, 4]
    assert ids.tolist() == [5, 6, 3, 6]
    with pytest.raises(ValueError, match="not a VRT"):
        robust_exclusions(labels, [([3], torch.tensor([1]))], vrt_base=base)


def test_default_run_is_valid_input_to_format_rec():
    from trp.grammar import format_rec

    few = torch.tensor([3, 4])
    for seed in range(5):
        run = sample_target_patches(
            few, (4, 4), num=4, generator=torch.Generator().manual_seed(seed)
        )
        assert len(set(run.tolist())) == run.numel()
        assert "<|VRT_3|>" in format_rec("the cat", patches=run.tolist()).text
