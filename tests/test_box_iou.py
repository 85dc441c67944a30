"""trp.ops.box_iou / generalized_box_iou: parity, gradients, op registration, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tests.conftest import random_boxes, requires_native
from trp.ops import BoxIoU, box_iou, generalized_box_iou, reference

PAIRS = [
    (box_iou, torchvision.ops.box_iou, reference.box_iou),
    (generalized_box_iou, torchvision.ops.generalized_box_iou, reference.generalized_box_iou),
]


def degenerate_boxes(dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # unit box
            [0.0, 0.0, 1.0, 1.0],  # identical
            [2.0, 2.0, 3.0, 3.0],  # disjoint
            [0.25, 0.25, 0.5, 0.5],  # nested
            [0.5, 0.5, 0.5, 0.5],  # zero area (a point)
            [0.0, 0.2, 1.0, 0.2],  # zero height
            [1.0, 0.0, 2.0, 1.0],  # touching edge
        ],
        dtype=dtype,
    )


@pytest.mark.parametrize(("ours", "tv", "ref"), PAIRS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_parity_random(ours, tv, ref, dtype, tol, gen):
    b1 = random_boxes(37, dtype=dtype, generator=gen)
    b2 = random_boxes(23, dtype=dtype, generator=gen)
    out = ours(b1, b2)
    assert out.shape == (37, 23) and out.dtype == dtype
    torch.testing.assert_close(out, tv(b1, b2), rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref(b1, b2), rtol=tol, atol=tol)


@pytest.mark.parametrize(("ours", "tv", "ref"), PAIRS)
def test_parity_degenerate(ours, tv, ref):
    b = degenerate_boxes()
    out = ours(b, b)
    expected = tv(b, b)
    # torchvision divides 0 by 0 for two zero-area boxes; trp defines that as 0.
    nan = expected.isnan()
    assert nan.any(), "the fixture should exercise the 0/0 case"
    torch.testing.assert_close(out[~nan], expected[~nan], rtol=1e-12, atol=1e-12)
    # The 0/0 IoU term is 0; GIoU keeps its (well-defined) enclosing-box penalty.
    assert out[nan].isfinite().all() and (out[nan].abs() <= 1).all()
    if ours is box_iou:
        assert (out[nan] == 0).all()
    torch.testing.assert_close(out, ref(b, b), rtol=1e-12, atol=1e-12)


def test_known_values():
    b = degenerate_boxes()
    iou = box_iou(b, b)
    assert iou[0, 1] == 1.0 and iou[0, 2] == 0.0 and iou[0, 3] == pytest.approx(0.0625)
    giou = generalized_box_iou(b[:1], b[2:3])
    # union 2, enclosing 9: 0 - (9 - 2) / 9
    assert giou.item() == pytest.approx(-7 / 9)


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
@pytest.mark.parametrize(("n", "m"), [(0, 5), (5, 0), (0, 0)])
def test_empty(fn, n, m, gen):
    out = fn(random_boxes(n, generator=gen), random_boxes(m, generator=gen))
    assert out.shape == (n, m)


@pytest.mark.parametrize(("ours", "tv", "ref"), PAIRS)
def test_non_contiguous(ours, tv, ref, gen):
    b1 = random_boxes(20, generator=gen)[::2]
    b2 = random_boxes(8, generator=gen).t().contiguous().t()
    assert not b1.is_contiguous() and not b2.is_contiguous()
    torch.testing.assert_close(ours(b1, b2), tv(b1, b2))


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_gradcheck_fp64(fn, gen):
    b1 = random_boxes(6, generator=gen).requires_grad_()
    b2 = random_boxes(5, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(fn, (b1, b2))


@pytest.mark.parametrize(("ours", "tv", "ref"), PAIRS)
def test_gradient_matches_reference_including_ties(ours, tv, ref):
    b = degenerate_boxes()
    grads = []
    for fn in (ours, ref):
        x, y = b.clone().requires_grad_(), b.clone().requires_grad_()
        weights = torch.linspace(-1, 1, b.shape[0] ** 2, dtype=b.dtype).view(b.shape[0], -1)
        (fn(x, y) * weights).sum().backward()
        grads.append((x.grad, y.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@requires_native
@pytest.mark.parametrize("op", ["box_iou", "generalized_box_iou"])
def test_opcheck(op, gen):
    b1 = random_boxes(5, generator=gen).requires_grad_()
    b2 = random_boxes(4, generator=gen).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.trp, op), (b1, b2))
    torch.library.opcheck(getattr(torch.ops.trp, op), (b1.detach().float(), b2.detach().float()))


@requires_native
def test_opcheck_backward(gen):
    b1, b2 = random_boxes(5, generator=gen), random_boxes(4, generator=gen)
    grad = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    torch.library.opcheck(torch.ops.trp.box_iou_backward, (grad, b1, b2, True))


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_bad_inputs_raise(fn, gen):
    good = random_boxes(3, generator=gen)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        fn(good[:, :3], good)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        fn(good, good[None])
    with pytest.raises(TypeError, match="floating"):
        fn(good.long(), good)
    with pytest.raises(TypeError, match="same dtype"):
        fn(good, good.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[0, 0, 1, 1]], good)
    with pytest.raises(ValueError, match="same device"):
        fn(good, good.to("meta"))


@requires_native
def test_native_op_checks_preconditions(gen):
    good = random_boxes(3, generator=gen)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        torch.ops.trp.box_iou(good[:, :2], good)
    with pytest.raises(TypeError, match="floating"):
        torch.ops.trp.generalized_box_iou(good.int(), good.int())
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.trp.box_iou(good, good.float())
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.trp.box_iou_backward(torch.zeros(2, 2, dtype=good.dtype), good, good, False)


def test_module_wrapper(gen):
    b1, b2 = random_boxes(4, generator=gen), random_boxes(3, generator=gen)
    torch.testing.assert_close(BoxIoU(generalized=True)(b1, b2), generalized_box_iou(b1, b2))
    torch.testing.assert_close(BoxIoU()(b1, b2), box_iou(b1, b2))
    assert "generalized=True" in repr(BoxIoU(generalized=True))


@requires_native
def test_torch_compile_no_graph_break(gen):
    b1, b2 = random_boxes(4, generator=gen), random_boxes(3, generator=gen)
    compiled = torch.compile(lambda a, b: generalized_box_iou(a, b).sum(), fullgraph=True)
    torch.testing.assert_close(compiled(b1, b2), generalized_box_iou(b1, b2).sum())
