"""ImageBinding: patch/image/sample bookkeeping and local <-> global VRT ids."""

from __future__ import annotations

import pytest
import torch

from trp.vrt import ImageBinding

BASE = 100


@pytest.fixture
def binding() -> ImageBinding:
    # sample 0: one 2x3 image; sample 1: two images 2x2 and 1x3; sample 2: one 3x2 image
    return ImageBinding.from_grids([[2, 3], [2, 2], [1, 3], [3, 2]], [1, 2, 1], vrt_base=BASE)


def test_offsets_and_sizes(binding):
    assert binding.image_offsets.tolist() == [0, 6, 10, 13, 19]
    assert binding.sample_offsets.tolist() == [0, 6, 13, 19]
    assert binding.image_local_offset.tolist() == [0, 0, 4, 0]
    assert binding.patches_per_sample.tolist() == [6, 7, 6]
    assert binding.max_patches == 7
    assert binding.total_patches == 19
    assert binding.images_of(1) == [1, 2]


def test_from_grid_thw_merges():
    thw = torch.tensor([[1, 4, 6], [1, 2, 2]])
    b = ImageBinding.from_grid_thw(thw, [1, 1], vrt_base=BASE, spatial_merge_size=2)
    assert b.grids.tolist() == [[1, 2, 3], [1, 1, 1]]
    assert b.sample_offsets.tolist() == [0, 6, 7]
    with pytest.raises(ValueError, match="multiples"):
        ImageBinding.from_grid_thw(torch.tensor([[1, 3, 4]]), [1], vrt_base=BASE)


def test_own_image_mask(binding):
    mask = binding.own_image_mask()
    assert mask.dtype == torch.bool
    assert mask.shape == (3, 7)
    assert mask.sum(1).tolist() == [6, 7, 6]
    assert not mask[0, 6]
    assert mask[1, 6]
    assert not mask[2, 6]


def test_local_index_convention(binding):
    # second image of sample 1 starts after the 4 patches of the first
    assert binding.local_index(2, 0, 1) == 4 + 1
    assert binding.local_index(3, 2, 1) == 2 * 2 + 1
    assert binding.patch_of(1, 5) == (2, 0, 0, 1)
    assert binding.patch_of(2, 5) == (3, 0, 2, 1)
    with pytest.raises(IndexError):
        binding.local_index(0, 2, 0)
    with pytest.raises(ValueError, match="not a patch"):
        binding.patch_of(0, 6)


def test_global_round_trip(binding):
    ids = torch.tensor([BASE + 0, BASE + 6, BASE + 5])
    samples = torch.tensor([1, 1, 2])
    rows = binding.to_global(ids, samples)
    assert rows.tolist() == [6, 12, 18]
    back_sample, back_ids = binding.to_vrt_ids(rows)
    assert back_sample.tolist() == samples.tolist()
    assert back_ids.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="not a patch of sample 0"):
        binding.to_global(torch.tensor([BASE + 6]), torch.tensor([0]))
    with pytest.raises(ValueError, match="not a patch"):
        binding.to_global(torch.tensor([BASE - 1]), torch.tensor([0]))


def test_rows_per_sample(binding):
    assert binding.sample_of_rows(6).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="divide"):
        binding.sample_of_rows(4)


def test_sample_without_image():
    b = ImageBinding.from_grids([[2, 2]], [0, 1], vrt_base=BASE)
    assert b.patches_per_sample.tolist() == [0, 4]
    assert b.own_image_mask().tolist()[0] == [False] * 4


@pytest.mark.parametrize(
    ("grids", "counts", "base", "match"),
    [
        ([[2, 2]], [2], BASE, "sum to"),
        ([[0, 2]], [1], BASE, ">= 1"),
        ([[2, 2, 2, 2]], [1], BASE, "shape"),
        ([[2, 2]], [1], 0, "vrt_base"),
        ([[2.0, 2.0]], [1], BASE, None),
    ],
)
def test_bad_inputs(grids, counts, base, match):
    if match is None:
        with pytest.raises(TypeError):
            ImageBinding.from_grids(torch.tensor(grids), counts, vrt_base=base)
    else:
        with pytest.raises(ValueError, match=match):
            ImageBinding.from_grids(grids, counts, vrt_base=base)


def test_scalar_lookups_agree_with_the_tensors(binding):
    # The Python tables behind patch_of / images_of / num_patches_of / grid_of (no tensor op
    # per object) say what the tensors say, and check their arguments the same way.
    assert [binding.num_patches_of(s) for s in range(3)] == binding.patches_per_sample.tolist()
    assert [binding.grid_of(i) for i in range(4)] == [tuple(g) for g in binding.grids.tolist()]
    assert [binding.images_of(s) for s in range(3)] == [[0], [1, 2], [3]]
    # sample 1's local 5 is the second image's patch (row 0, col 1)
    assert binding.patch_of(1, 5) == (2, 0, 0, 1)
    with pytest.raises(IndexError, match="sample 3"):
        binding.num_patches_of(3)
    with pytest.raises(IndexError, match="image 4"):
        binding.grid_of(4)
    empty = ImageBinding.from_grids([[2, 2]], [0, 1], vrt_base=BASE)
    assert empty.images_of(0) == [] and empty.num_patches_of(0) == 0
