"""trp.ops.point_mask_loss / point_mask_logits: parity with the eager Mask2Former path,
gradients, importance sampling, op registration, bad inputs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_native
from trp.ops import (
    PointMaskLoss,
    point_mask_logits,
    point_mask_loss,
    point_mask_loss_per_query,
    reference,
    sample_points,
    use_fused,
)


def problem(
    *,
    q: int = 6,
    c: int = 13,
    b: int = 2,
    h: int = 9,
    w: int = 7,
    p: int = 11,
    th: int = 12,
    tw: int = 10,
    dtype: torch.dtype = torch.float64,
    lo: float = 0.0,
    hi: float = 1.0,
    gen: torch.Generator,
) -> dict:
    """Random inputs; points uniform in [lo, hi]^2 (outside [0, 1] samples zero padding)."""
    return {
        "mask_embed": torch.randn(q, c, dtype=dtype, generator=gen),
        "pixel_features": torch.randn(b, c, h, w, dtype=dtype, generator=gen),
        "image_index": torch.randint(0, b, (q,), generator=gen),
        "target_masks": (torch.rand(q, th, tw, generator=gen) > 0.5).to(dtype),
        "points": lo + (hi - lo) * torch.rand(q, p, 2, dtype=dtype, generator=gen),
    }


def logits_args(x: dict) -> tuple:
    return x["mask_embed"], x["pixel_features"], x["image_index"], x["points"]


def loss_args(x: dict) -> tuple:
    return x["mask_embed"], x["pixel_features"], x["image_index"], x["target_masks"], x["points"]


TOLERANCES = [(torch.float64, 1e-10), (torch.float32, 1e-4)]


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (-0.3, 1.3)])
def test_logits_parity(dtype, tol, lo, hi, gen):
    x = problem(dtype=dtype, lo=lo, hi=hi, gen=gen)
    out = point_mask_logits(*logits_args(x))
    assert out.shape == (6, 11)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out, reference.point_mask_logits(*logits_args(x)), rtol=tol, atol=tol
    )


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (-0.3, 1.3)])
def test_loss_parity(dtype, tol, lo, hi, gen):
    x = problem(dtype=dtype, lo=lo, hi=hi, q=9, c=33, h=16, w=12, p=50, gen=gen)
    out = point_mask_loss_per_query(*loss_args(x))
    assert out.shape == (9, 2)
    assert out.dtype == dtype
    expected = reference.point_mask_loss(*loss_args(x))
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    # Several chunks per image (the CPU kernel projects a bounded number of queries at a time).
    big = problem(dtype=dtype, q=40, c=8, b=2, h=256, w=200, p=20, gen=gen)
    torch.testing.assert_close(
        point_mask_loss_per_query(*loss_args(big)),
        reference.point_mask_loss(*loss_args(big)),
        rtol=tol,
        atol=tol,
    )


def test_bool_targets_and_points_on_pixel_centres(gen):
    x = problem(gen=gen)
    x["target_masks"] = x["target_masks"].bool()
    # Points exactly on pixel centres and edges of both grids.
    x["points"][:, :3] = torch.tensor(
        [[0.5 / 7, 0.5 / 9], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64
    )
    out = point_mask_loss_per_query(*loss_args(x))
    expected = reference.point_mask_loss(*loss_args(x))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_known_value():
    # One query, one pixel feature map of constant logit 0 -> sigma = 1/2 everywhere.
    embed = torch.ones(1, 1, dtype=torch.float64)
    features = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    targets = torch.ones(1, 4, 4, dtype=torch.float64)
    points = torch.full((1, 8, 2), 0.5, dtype=torch.float64)
    out = point_mask_loss_per_query(
        embed, features, torch.zeros(1, dtype=torch.long), targets, points
    )
    # CE = log 2; dice = 1 - (2 * 4 + 1) / (4 + 8 + 1)
    torch.testing.assert_close(
        out[0], torch.tensor([0.6931471805599453, 1 - 9 / 13], dtype=torch.float64)
    )


@pytest.mark.parametrize("c", [5, 1])
def test_gradcheck_loss_fp64(c, gen):
    x = problem(q=4, c=c, b=2, h=5, w=4, p=7, th=6, tw=9, lo=-0.2, hi=1.2, gen=gen)
    embed = x["mask_embed"].requires_grad_()
    features = x["pixel_features"].requires_grad_()

    def fn(e, f):
        return point_mask_loss_per_query(e, f, x["image_index"], x["target_masks"], x["points"])

    assert torch.autograd.gradcheck(fn, (embed, features))


def test_gradcheck_logits_fp64(gen):
    x = problem(q=3, c=3, b=2, h=4, w=5, p=6, lo=-0.2, hi=1.2, gen=gen)
    embed = x["mask_embed"].requires_grad_()
    features = x["pixel_features"].requires_grad_()

    def fn(e, f):
        return point_mask_logits(e, f, x["image_index"], x["points"])

    assert torch.autograd.gradcheck(fn, (embed, features))


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_gradient_matches_reference(dtype, tol, gen):
    x = problem(q=12, c=37, b=3, h=20, w=17, p=64, dtype=dtype, lo=-0.1, hi=1.1, gen=gen)
    grads = []
    for fn in (point_mask_loss_per_query, reference.point_mask_loss):
        e = x["mask_embed"].clone().requires_grad_()
        f = x["pixel_features"].clone().requires_grad_()
        out = fn(e, f, x["image_index"], x["target_masks"], x["points"])
        (out * torch.tensor([1.5, -0.7], dtype=dtype)).sum().backward()
        grads.append((e.grad, f.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)


def test_empty_queries_and_images_without_queries(gen):
    x = problem(q=0, gen=gen)
    x["mask_embed"].requires_grad_()
    x["pixel_features"].requires_grad_()
    assert point_mask_loss_per_query(*loss_args(x)).shape == (0, 2)
    assert point_mask_logits(*logits_args(x)).shape == (0, 11)
    losses = point_mask_loss(*loss_args(x)[:4], num_points=5)
    assert losses["loss_mask"].item() == 0
    assert losses["loss_dice"].item() == 0
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert (x["pixel_features"].grad == 0).all()
    assert x["mask_embed"].grad.shape == (0, 13)
    # Image 1 has no query: its feature gradient is zero.
    y = problem(q=3, b=3, gen=gen)
    y["image_index"] = torch.tensor([0, 2, 0])
    f = y["pixel_features"].requires_grad_()
    point_mask_loss_per_query(*loss_args(y)).sum().backward()
    assert (f.grad[1] == 0).all()
    assert (f.grad[0] != 0).any()


def test_non_contiguous(gen):
    x = problem(q=5, c=6, gen=gen)
    nc = {
        "mask_embed": x["mask_embed"].t().contiguous().t(),
        "pixel_features": x["pixel_features"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "image_index": torch.stack([x["image_index"], x["image_index"]], 1)[:, 0],
        "target_masks": x["target_masks"].transpose(1, 2).contiguous().transpose(1, 2),
        "points": x["points"].transpose(0, 1).contiguous().transpose(0, 1),
    }
    assert not any(t.is_contiguous() for t in nc.values())
    torch.testing.assert_close(
        point_mask_loss_per_query(*loss_args(nc)), reference.point_mask_loss(*loss_args(x))
    )
    torch.testing.assert_close(
        point_mask_logits(*logits_args(nc)), reference.point_mask_logits(*logits_args(x))
    )


def test_sample_points_importance(gen):
    x = problem(q=4, c=8, h=16, w=16, gen=gen)
    args = logits_args(x)[:3]
    kwargs = {"num_points": 40, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75}
    points = sample_points(*args, generator=torch.Generator().manual_seed(3), **kwargs)
    again = sample_points(*args, generator=torch.Generator().manual_seed(3), **kwargs)
    assert points.shape == (4, 40, 2)
    assert torch.equal(points, again)
    assert ((points >= 0) & (points <= 1)).all()
    # The first 30 are the most uncertain of the 120 candidates drawn from the same generator.
    candidates = torch.rand(
        4, 120, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    logits = reference.point_mask_logits(*args, candidates).abs()
    kept = reference.point_mask_logits(*args, points[:, :30]).abs()
    threshold = logits.sort(1).values[:, 29:30]
    assert (kept <= threshold + 1e-12).all()
    other = sample_points(*args, generator=torch.Generator().manual_seed(4), **kwargs)
    assert not torch.equal(points, other)


def test_api_losses_and_module(gen):
    x = problem(q=5, gen=gen)
    args = loss_args(x)[:4]
    per_query = point_mask_loss_per_query(*loss_args(x))
    losses = point_mask_loss(*args, points=x["points"], num_masks=2.0)
    torch.testing.assert_close(losses["loss_mask"], per_query[:, 0].sum() / 2)
    torch.testing.assert_close(losses["loss_dice"], per_query[:, 1].sum() / 2)
    default = point_mask_loss(*args, points=x["points"])
    torch.testing.assert_close(default["loss_dice"], per_query[:, 1].mean())
    module = PointMaskLoss(num_points=20, weight_mask=5.0, weight_dice=2.0)
    assert "num_points=20" in repr(module)
    out = module(*args, generator=torch.Generator().manual_seed(0))
    ref = point_mask_loss(*args, num_points=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss_mask"], 5.0 * ref["loss_mask"])
    torch.testing.assert_close(out["loss_dice"], 2.0 * ref["loss_dice"])
    with use_fused(False):
        eager = point_mask_loss(*args, num_points=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eager, ref)


@requires_native
def test_opcheck(gen):
    x = problem(q=4, c=5, h=5, w=6, p=7, gen=gen)
    x["mask_embed"].requires_grad_()
    x["pixel_features"].requires_grad_()
    torch.library.opcheck(torch.ops.trp.point_mask_loss, loss_args(x))
    torch.library.opcheck(torch.ops.trp.point_mask_logits, logits_args(x))
    detached = {k: v.detach() for k, v in x.items()}
    torch.library.opcheck(
        torch.ops.trp.point_mask_loss_backward,
        (torch.randn(4, 2, dtype=torch.float64, generator=gen), *loss_args(detached)),
    )
    torch.library.opcheck(
        torch.ops.trp.point_mask_logits_backward,
        (torch.randn(4, 7, dtype=torch.float64, generator=gen), *logits_args(detached)),
    )
    fp32 = {k: v.float() if v.is_floating_point() else v for k, v in detached.items()}
    torch.library.opcheck(torch.ops.trp.point_mask_loss, loss_args(fp32))


def test_bad_inputs_raise(gen):
    x = problem(gen=gen)
    e, f, i, t, p = loss_args(x)
    with pytest.raises(ValueError, match=r"\[Q, C\]"):
        point_mask_loss(e[None], f, i, t)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        point_mask_loss(e, f[:, :3], i, t)
    with pytest.raises(ValueError, match="image_index must be int64"):
        point_mask_loss(e, f, i.int(), t)
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 2\)"):
        point_mask_loss(e, f, i + 5, t)
    with pytest.raises(ValueError, match=r"target_masks must have shape \[Q, Ht, Wt\]"):
        point_mask_loss(e, f, i, t[:2])
    with pytest.raises(ValueError, match=r"points must have shape \[Q, P, 2\]"):
        point_mask_loss(e, f, i, t, points=p[..., :1])
    with pytest.raises(ValueError, match="at least one point"):
        point_mask_loss(e, f, i, t, points=p[:, :0])
    with pytest.raises(ValueError, match="num_points"):
        point_mask_loss(e, f, i, t, num_points=0)
    with pytest.raises(TypeError, match="floating"):
        point_mask_loss(e.long(), f, i, t)
    with pytest.raises(TypeError, match="same dtype"):
        point_mask_loss(e, f.float(), i, t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        point_mask_loss(e, f, i, t.tolist())
    with pytest.raises(ValueError, match="same device"):
        point_mask_loss(e, f.to("meta"), i, t)
    with pytest.raises(ValueError, match="non-empty"):
        point_mask_loss(e, f[:, :, :0], i, t)


@requires_native
def test_native_op_checks_preconditions(gen):
    x = problem(gen=gen)
    e, f, i, t, p = loss_args(x)
    op = torch.ops.trp.point_mask_loss
    with pytest.raises(ValueError, match=r"pixel_features must have shape \[B, C, H, W\]"):
        op(e, f[:, :2], i, t, p)
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 2\)"):
        op(e, f, i - 1, t, p)
    with pytest.raises(TypeError, match="image_index must have dtype"):
        op(e, f, i.float(), t, p)
    with pytest.raises(ValueError, match=r"target_masks must have shape"):
        op(e, f, i, t[None], p)
    with pytest.raises(TypeError, match="same dtype"):
        op(e, f, i, t.float(), p)
    with pytest.raises(ValueError, match="at least one point"):
        op(e, f, i, t, p[:, :0])
    with pytest.raises(ValueError, match=r"points must have shape"):
        torch.ops.trp.point_mask_logits(e, f, i, p[:3])
    with pytest.raises(ValueError, match=r"grad must have shape \[Q, 2\]"):
        torch.ops.trp.point_mask_loss_backward(torch.zeros(6, 3, dtype=e.dtype), e, f, i, t, p)
    with pytest.raises(ValueError, match=r"grad must have shape \[Q, P\]"):
        torch.ops.trp.point_mask_logits_backward(torch.zeros(6, 3, dtype=e.dtype), e, f, i, p)


@requires_native
def test_torch_compile_no_graph_break(gen):
    x = problem(q=4, c=5, gen=gen)

    def fn(e, f, i, t, p):
        losses = point_mask_loss(e, f, i, t, points=p)
        return losses["loss_mask"] + losses["loss_dice"]

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*loss_args(x)), fn(*loss_args(x)))
    sampled = torch.compile(lambda e, f, i: sample_points(e, f, i, num_points=8), fullgraph=True)
    assert sampled(*logits_args(x)[:3]).shape == (4, 8, 2)
