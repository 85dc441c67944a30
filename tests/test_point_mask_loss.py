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
    point_mask_loss_layers,
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


# ---- point_mask_loss_layers: all decoder layers in one call, points generated from a seed ----


def layers_problem(
    *,
    layers: int = 3,
    q: int = 7,
    c: int = 13,
    b: int = 3,
    h: int = 9,
    w: int = 11,
    th: int = 12,
    tw: int = 10,
    dtype: torch.dtype = torch.float64,
    gen: torch.Generator,
) -> dict:
    return {
        "mask_embed": torch.randn(layers, q, c, dtype=dtype, generator=gen),
        "pixel_features": torch.randn(b, c, h, w, dtype=dtype, generator=gen),
        "image_index": torch.randint(0, b, (q,), generator=gen),
        "target_masks": (torch.rand(q, th, tw, generator=gen) > 0.5).to(dtype),
    }


def layers_args(x: dict) -> tuple:
    return x["mask_embed"], x["pixel_features"], x["image_index"], x["target_masks"]


def sampling_sizes(num_points: int, oversample: float, importance: float) -> tuple[int, int, int]:
    return num_points, int(importance * num_points), int(num_points * oversample)


def fused_and_reference(
    x,
    *,
    grad_scale,
    seed=1234,
    p=23,
    oversample=3.0,
    importance=0.75,
    wm=5.0,
    wd=2.0,
    num_masks=None,
):
    """(total, per_layer, grad_embed, grad_features) from the API and from the eager reference."""
    results = []
    sizes = sampling_sizes(p, oversample, importance)
    nm = float(num_masks if num_masks is not None else max(x["mask_embed"].shape[1], 1))
    for fused in (True, False):
        e = x["mask_embed"].clone().requires_grad_()
        f = x["pixel_features"].clone().requires_grad_()
        args = (e, f, x["image_index"], x["target_masks"])
        if fused:
            out = point_mask_loss_layers(
                *args,
                num_points=p,
                oversample_ratio=oversample,
                importance_sample_ratio=importance,
                weight_mask=wm,
                weight_dice=wd,
                num_masks=num_masks,
                seed=seed,
            )
            total = out["loss"]
            per_layer = torch.stack([out["loss_mask"], out["loss_dice"]], 1)
            assert not per_layer.requires_grad
        else:
            total, per_layer = reference.point_mask_loss_layers(*args, seed, *sizes, wm, wd, nm)
        (total * grad_scale).backward()
        results.append((total.detach(), per_layer.detach(), e.grad, f.grad))
    return results


@requires_native
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("grad_scale", [1.0, -2.5])
@pytest.mark.parametrize(
    ("oversample", "importance"), [(3.0, 0.75), (1.0, 0.0), (1.0, 1.0), (2.5, 0.5)]
)
def test_layers_fp64_parity_with_reference(layers, grad_scale, oversample, importance, gen):
    x = layers_problem(layers=layers, gen=gen)
    fused, ref = fused_and_reference(
        x, grad_scale=grad_scale, oversample=oversample, importance=importance
    )
    assert fused[0].shape == () and fused[1].shape == (layers, 2)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@requires_native
def test_layers_fp32_parity_and_num_masks(gen):
    x = layers_problem(dtype=torch.float32, c=21, h=14, w=10, gen=gen)
    fused, ref = fused_and_reference(x, grad_scale=0.7, p=40, num_masks=2.5)
    assert fused[0].dtype == torch.float32
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@requires_native
def test_layers_several_chunks_per_image(gen):
    # 256 x 200 pixels -> the CPU kernel projects 40 rows at a time; 60 rows per image here.
    x = layers_problem(layers=3, q=40, c=8, b=2, h=256, w=200, gen=gen)
    x["image_index"] = torch.arange(40) % 2
    fused, ref = fused_and_reference(x, grad_scale=1.3, p=20)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layer_points_twin(gen):
    x = layers_problem(gen=gen)
    args = (x["mask_embed"], x["pixel_features"], x["image_index"])
    points = reference.point_mask_layer_points(*args, 77, 30, 20, 90)
    assert points.shape == (3, 7, 30, 2)
    assert points.dtype == torch.float64
    assert ((points >= 0) & (points < 1)).all()
    # 24-bit uniforms: exact multiples of 2^-24.
    assert torch.equal(points * 2**24, (points * 2**24).round())
    assert torch.equal(points, reference.point_mask_layer_points(*args, 77, 30, 20, 90))
    other = reference.point_mask_layer_points(*args, 78, 30, 20, 90)
    assert not torch.equal(points, other)
    # Layers and queries get different points.
    assert not torch.equal(points[0], points[1])
    assert not torch.equal(points[:, 0], points[:, 1])
    # The first 20 are the most uncertain of the 90 candidates (all candidates kept when
    # num_uncertain = num_candidates, in index order).
    all_candidates = reference.point_mask_layer_points(*args, 77, 90, 90, 90)
    for layer in range(3):
        logits = reference.point_mask_logits(
            x["mask_embed"][layer], x["pixel_features"], x["image_index"], all_candidates[layer]
        ).abs()
        kept = reference.point_mask_logits(
            x["mask_embed"][layer], x["pixel_features"], x["image_index"], points[layer, :, :20]
        ).abs()
        threshold = logits.sort(1).values[:, 19:20]
        assert (kept <= threshold + 1e-12).all()
    # Seeds wider than 32 bits and negative seeds are accepted.
    big = reference.point_mask_layer_points(*args, 2**40 + 77, 30, 0, 0)
    assert not torch.equal(big, reference.point_mask_layer_points(*args, 77, 30, 0, 0))
    assert reference.point_mask_layer_points(*args, -5, 4, 0, 0).shape == (3, 7, 4, 2)


@requires_native
def test_layers_seed_and_generator(gen):
    x = layers_problem(gen=gen)
    kwargs = {"num_points": 25}

    def loss(**kw):
        return point_mask_loss_layers(*layers_args(x), **kwargs, **kw)["loss"]

    assert torch.equal(loss(seed=5), loss(seed=5))
    assert not torch.equal(loss(seed=5), loss(seed=6))
    assert torch.equal(loss(seed=2**50 + 3), loss(seed=2**50 + 3))
    assert torch.equal(
        loss(generator=torch.Generator().manual_seed(9)),
        loss(generator=torch.Generator().manual_seed(9)),
    )
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(9)))
    assert torch.equal(loss(generator=torch.Generator().manual_seed(9)), loss(seed=seed))
    torch.manual_seed(3)
    first = loss()
    torch.manual_seed(3)
    assert torch.equal(first, loss())
    # Negative seeds: the op and the twin agree.
    total, _ = reference.point_mask_loss_layers(*layers_args(x), -7, 25, 18, 75, 1.0, 1.0, 7.0)
    torch.testing.assert_close(loss(seed=-7), total, rtol=1e-10, atol=1e-12)


@requires_native
def test_layers_fallback_path_matches(gen):
    x = layers_problem(gen=gen)
    e = x["mask_embed"].clone().requires_grad_()
    fused = point_mask_loss_layers(e, *layers_args(x)[1:], num_points=15, seed=4)
    fused["loss"].backward()
    e2 = x["mask_embed"].clone().requires_grad_()
    with use_fused(False):
        eager = point_mask_loss_layers(e2, *layers_args(x)[1:], num_points=15, seed=4)
    eager["loss"].backward()
    assert not eager["loss_mask"].requires_grad
    for key in ("loss", "loss_mask", "loss_dice"):
        torch.testing.assert_close(fused[key].detach(), eager[key].detach())
    torch.testing.assert_close(e.grad, e2.grad)


@requires_native
def test_layers_only_one_input_requires_grad(gen):
    x = layers_problem(gen=gen)
    f = x["pixel_features"].clone().requires_grad_()
    out = point_mask_loss_layers(x["mask_embed"], f, *layers_args(x)[2:], num_points=9, seed=1)
    (2 * out["loss"]).backward()
    f2 = x["pixel_features"].clone().requires_grad_()
    total, _ = reference.point_mask_loss_layers(
        x["mask_embed"], f2, *layers_args(x)[2:], 1, *sampling_sizes(9, 3.0, 0.75), 1.0, 1.0, 7.0
    )
    (2 * total).backward()
    torch.testing.assert_close(f.grad, f2.grad, rtol=1e-10, atol=1e-12)


@requires_native
def test_layers_no_grad_skips_the_gradient(gen, monkeypatch):
    x = layers_problem(gen=gen)
    e = x["mask_embed"].clone().requires_grad_()
    calls = []
    op = torch.ops.trp.point_mask_loss_layers

    def spy(*args):
        calls.append(args[-1])
        return op(*args)

    monkeypatch.setattr(torch.ops.trp, "point_mask_loss_layers", spy)
    with torch.no_grad():
        out = point_mask_loss_layers(e, *layers_args(x)[1:], num_points=9, seed=1)
    assert out["loss"].grad_fn is None
    point_mask_loss_layers(*layers_args(x), num_points=9, seed=1)  # nothing requires grad
    point_mask_loss_layers(e, *layers_args(x)[1:], num_points=9, seed=1)
    assert calls == [False, False, True]
    monkeypatch.undo()
    raw = torch.ops.trp.point_mask_loss_layers(*layers_args(x), 1, 9, 6, 27, 1.0, 1.0, 7.0, False)
    assert raw[2].shape == (0,) and raw[3].shape == (0,)
    with_grad = torch.ops.trp.point_mask_loss_layers(
        *layers_args(x), 1, 9, 6, 27, 1.0, 1.0, 7.0, True
    )
    assert with_grad[2].shape == (3, 7, 13) and with_grad[3].shape == (3, 13, 9, 11)
    torch.testing.assert_close(raw[0], with_grad[0], rtol=0, atol=0)
    torch.testing.assert_close(raw[1], with_grad[1], rtol=0, atol=0)


@requires_native
def test_layers_backward_errors(gen):
    x = layers_problem(gen=gen)
    e = x["mask_embed"].clone().requires_grad_()
    out = point_mask_loss_layers(e, *layers_args(x)[1:], num_points=9, seed=1)
    out["loss"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out["loss"].backward()
    raw = torch.ops.trp.point_mask_loss_layers(
        e, *layers_args(x)[1:], 1, 9, 6, 27, 1.0, 1.0, 7.0, False
    )
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        raw[0].backward()


@requires_native
def test_layers_empty_queries_and_layers(gen):
    for layers, q in [(3, 0), (0, 5)]:
        x = layers_problem(layers=layers, q=q, gen=gen)
        e = x["mask_embed"].requires_grad_()
        f = x["pixel_features"].requires_grad_()
        out = point_mask_loss_layers(e, f, *layers_args(x)[2:], num_points=5, seed=0)
        assert out["loss"].item() == 0
        assert out["loss_mask"].shape == (layers,) and (out["loss_mask"] == 0).all()
        out["loss"].backward()
        assert (f.grad == 0).all() and e.grad.shape == (layers, q, 13)
    # An image without queries gets a zero feature gradient.
    x = layers_problem(q=3, gen=gen)
    x["image_index"] = torch.tensor([0, 2, 0])
    f = x["pixel_features"].requires_grad_()
    point_mask_loss_layers(x["mask_embed"], f, *layers_args(x)[2:], num_points=5)["loss"].backward()
    assert (f.grad[1] == 0).all() and (f.grad[0] != 0).any()


@requires_native
def test_layers_non_contiguous_and_bool_targets(gen):
    x = layers_problem(gen=gen)
    nc = {
        "mask_embed": x["mask_embed"].transpose(0, 1).contiguous().transpose(0, 1),
        "pixel_features": x["pixel_features"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "image_index": torch.stack([x["image_index"], x["image_index"]], 1)[:, 0],
        "target_masks": x["target_masks"].bool().transpose(1, 2).contiguous().transpose(1, 2),
    }
    assert not any(t.is_contiguous() for t in nc.values())
    a = point_mask_loss_layers(*layers_args(nc), num_points=17, seed=3)
    b = point_mask_loss_layers(*layers_args(x), num_points=17, seed=3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_layers_bad_inputs_raise(gen):
    x = layers_problem(gen=gen)
    e, f, i, t = layers_args(x)
    with pytest.raises(ValueError, match=r"\[L, Q, C\]"):
        point_mask_loss_layers(e[0], f, i, t)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        point_mask_loss_layers(e, f[:, :3], i, t)
    with pytest.raises(ValueError, match="image_index must be int64"):
        point_mask_loss_layers(e, f, i[:3], t)
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 3\)"):
        point_mask_loss_layers(e, f, i + 5, t)
    with pytest.raises(ValueError, match=r"target_masks must have shape \[Q, Ht, Wt\]"):
        point_mask_loss_layers(e, f, i, t[:2])
    with pytest.raises(ValueError, match="num_points"):
        point_mask_loss_layers(e, f, i, t, num_points=0)
    with pytest.raises(ValueError, match="oversample_ratio"):
        point_mask_loss_layers(e, f, i, t, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        point_mask_loss_layers(e, f, i, t, importance_sample_ratio=1.5)
    with pytest.raises(ValueError, match="num_masks"):
        point_mask_loss_layers(e, f, i, t, num_masks=0.0)
    with pytest.raises(TypeError, match="floating"):
        point_mask_loss_layers(e.long(), f, i, t)
    with pytest.raises(TypeError, match="same dtype"):
        point_mask_loss_layers(e, f.float(), i, t)
    with pytest.raises(ValueError, match="same device"):
        point_mask_loss_layers(e, f.to("meta"), i, t)


@requires_native
def test_layers_native_op_checks_preconditions(gen):
    x = layers_problem(gen=gen)
    e, f, i, t = layers_args(x)
    op = torch.ops.trp.point_mask_loss_layers
    sizes = (1, 9, 6, 27, 1.0, 1.0, 7.0, True)
    with pytest.raises(ValueError, match=r"mask_embed must have shape \[L, Q, C\]"):
        op(e[0], f, i, t, *sizes)
    with pytest.raises(ValueError, match=r"pixel_features must have shape \[B, C, H, W\]"):
        op(e, f[:, :2], i, t, *sizes)
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 3\)"):
        op(e, f, i - 1, t, *sizes)
    with pytest.raises(ValueError, match=r"image_index must have shape \[7\]"):
        op(e, f, i[:2], t, *sizes)
    with pytest.raises(TypeError, match="image_index must have dtype"):
        op(e, f, i.float(), t, *sizes)
    with pytest.raises(ValueError, match=r"target_masks must have shape"):
        op(e, f, i, t[None], *sizes)
    with pytest.raises(TypeError, match="same dtype"):
        op(e, f, i, t.float(), *sizes)
    with pytest.raises(TypeError, match="floating"):
        op(e.long(), f.long(), i, t.long(), *sizes)
    with pytest.raises(ValueError, match="num_points must lie"):
        op(e, f, i, t, 1, 0, 0, 0, 1.0, 1.0, 7.0, True)
    with pytest.raises(ValueError, match="num_uncertain must lie"):
        op(e, f, i, t, 1, 9, 10, 27, 1.0, 1.0, 7.0, True)
    with pytest.raises(ValueError, match="num_candidates must lie"):
        op(e, f, i, t, 1, 9, 6, 5, 1.0, 1.0, 7.0, True)
    with pytest.raises(ValueError, match="num_masks must be positive"):
        op(e, f, i, t, 1, 9, 6, 27, 1.0, 1.0, 0.0, True)


@requires_native
@pytest.mark.parametrize("compute_grad", [True, False])
def test_layers_opcheck(compute_grad, gen):
    x = layers_problem(layers=2, q=4, c=5, h=5, w=6, gen=gen)
    # The raw op gives gradients only when asked for them (compute_grad).
    x["mask_embed"].requires_grad_(compute_grad)
    x["pixel_features"].requires_grad_(compute_grad)
    args = (*layers_args(x), 11, 9, 6, 27, 2.0, 3.0, 4.0, compute_grad)
    torch.library.opcheck(
        torch.ops.trp.point_mask_loss_layers,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@requires_native
def test_layers_torch_compile_no_graph_break(gen):
    x = layers_problem(q=4, c=5, gen=gen)

    def fn(e, f, i, t):
        return point_mask_loss_layers(e, f, i, t, num_points=8, seed=21, weight_mask=5.0)["loss"]

    e = x["mask_embed"].clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(e, *layers_args(x)[1:])
    out.backward()
    e2 = x["mask_embed"].clone().requires_grad_()
    expected = fn(e2, *layers_args(x)[1:])
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(e.grad, e2.grad)


@pytest.mark.parametrize("fused", [True, False])
def test_under_cpu_bf16_autocast(fused, gen):
    # Under autocast the mask head hands bfloat16 embeddings next to float32 pixel features;
    # the ops compute in float32 and return float32 (no caller casts head outputs by hand).
    x = problem(dtype=torch.float32, gen=gen)
    embed = x["mask_embed"].bfloat16().requires_grad_()
    exact = {**x, "mask_embed": embed.detach().float()}
    with use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = point_mask_logits(embed, *logits_args(x)[1:])
        per_query = point_mask_loss_per_query(embed, *loss_args(x)[1:])
        layers = point_mask_loss_layers(
            embed[None],
            x["pixel_features"],
            x["image_index"],
            x["target_masks"],
            seed=3,
            num_points=20,
        )
    assert logits.dtype == per_query.dtype == layers["loss"].dtype == torch.float32
    torch.testing.assert_close(logits, reference.point_mask_logits(*logits_args(exact)))
    torch.testing.assert_close(per_query, reference.point_mask_loss(*loss_args(exact)))
    want = point_mask_loss_layers(
        exact["mask_embed"][None],
        x["pixel_features"],
        x["image_index"],
        x["target_masks"],
        seed=3,
        num_points=20,
    )
    torch.testing.assert_close(layers["loss"], want["loss"])
    (logits.sum() + per_query.sum() + layers["loss"]).backward()
    assert embed.grad.dtype == torch.bfloat16 and embed.grad.isfinite().all()
