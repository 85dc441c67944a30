import pytest
import torch

from trp.data import collate


def _sample(n: int, size: int = 8) -> dict:
    return {
        "image": torch.rand(3, size, size),
        "box": torch.tensor([0.0, 1.0, 2.0, 3.0]),
        "boxes": torch.zeros(n, 4),
        "labels": torch.arange(n),
        "expression": f"{n} things",
        "index": n,
    }


def test_stacks_fixed_size_and_lists_per_instance_targets():
    batch = collate([_sample(2), _sample(3)])
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["box"].shape == (2, 4)
    assert [b.shape[0] for b in batch["boxes"]] == [2, 3]
    assert batch["labels"][1].tolist() == [0, 1, 2]
    assert batch["expression"] == ["2 things", "3 things"]
    assert torch.equal(batch["index"], torch.tensor([2, 3]))


def test_per_instance_keys_stay_lists_when_sizes_agree():
    batch = collate([_sample(2), _sample(2)])
    assert isinstance(batch["boxes"], list)
    assert len(batch["boxes"]) == 2


def test_bad_batches_raise():
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="cannot stack 'image'"):
        collate([_sample(1, 8), _sample(1, 16)])
    other = _sample(1)
    del other["box"]
    with pytest.raises(ValueError, match="keys"):
        collate([_sample(1), other])
