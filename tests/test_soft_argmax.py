"""trp.ops.soft_argmax: parity with the eager softmax expectation, gradients, op registration,
bad inputs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_native
from trp.ops import SoftArgmax, reference, soft_argmax

TOLERANCES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]


def heatmaps(*shape: int, dtype=torch.float64, scale: float = 3.0, gen=None) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=dtype, generator=gen)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize("beta", [1.0, 0.25, 20.0])
@pytest.mark.parametrize("shape", [(2, 3, 8, 5), (1, 17, 64, 48), (3, 1, 1, 7)])
def test_parity(dtype, tol, beta, shape, gen):
    x = heatmaps(*shape, dtype=dtype, gen=gen)
    out = soft_argmax(x, beta=beta)
    assert out.shape == (*shape[:2], 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.soft_argmax(x, beta), rtol=tol, atol=tol)


def test_known_values():
    x = torch.full((1, 2, 4, 5), -1e4, dtype=torch.float64)
    x[0, 0, 1, 3] = 0.0  # hard peak at row 1, column 3
    x[0, 1] = 0.0  # uniform: the centre of the image
    out = soft_argmax(x)
    torch.testing.assert_close(out[0, 0], torch.tensor([3.5 / 5, 1.5 / 4], dtype=torch.float64))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # beta = 0 ignores the heatmap.
    torch.testing.assert_close(soft_argmax(x, beta=0.0)[0, 0], out[0, 1])


def test_large_logits_are_stable(gen):
    # The running max must keep exp() in range where a naive sum would overflow.
    x = heatmaps(2, 3, 16, 16, dtype=torch.float32, scale=1.0, gen=gen) + 500.0
    out = soft_argmax(x, beta=5.0)
    assert out.isfinite().all()
    torch.testing.assert_close(out, reference.soft_argmax(x, 5.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 5, 3, 7)])
def test_gradcheck_fp64(shape, gen):
    x = heatmaps(*shape, scale=1.0, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda h: soft_argmax(h, beta=1.7), (x,))


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_gradient_matches_reference(dtype, tol, gen):
    x = heatmaps(4, 17, 32, 24, dtype=dtype, gen=gen)
    weights = torch.randn(4, 17, 2, dtype=dtype, generator=gen)
    grads = []
    for fn in (lambda h: soft_argmax(h, beta=2.0), lambda h: reference.soft_argmax(h, 2.0)):
        h = x.clone().requires_grad_()
        (fn(h) * weights).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty(shape):
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = soft_argmax(x)
    assert out.shape == (*shape[:2], 2)
    out.sum().backward()
    assert x.grad.shape == shape


def test_non_contiguous(gen):
    x = heatmaps(3, 4, 9, 6, gen=gen)
    nc = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not nc.is_contiguous()
    torch.testing.assert_close(soft_argmax(nc), reference.soft_argmax(x, 1.0))
    strided = heatmaps(3, 8, 9, 6, gen=gen)[:, ::2]
    torch.testing.assert_close(soft_argmax(strided), reference.soft_argmax(strided, 1.0))


@requires_native
def test_opcheck(gen):
    x = heatmaps(2, 3, 5, 4, scale=1.0, gen=gen).requires_grad_()
    torch.library.opcheck(torch.ops.trp.soft_argmax, (x, 1.5))
    torch.library.opcheck(torch.ops.trp.soft_argmax, (x.detach().float(), 0.5))
    coords, lse = torch.ops.trp.soft_argmax(x.detach(), 1.5)
    torch.library.opcheck(
        torch.ops.trp.soft_argmax_backward,
        (torch.randn_like(coords), torch.randn_like(lse), x.detach(), coords, lse, 1.5),
    )


@requires_native
def test_logsumexp_output_and_its_gradient(gen):
    x = heatmaps(2, 3, 5, 4, gen=gen)
    coords, lse = torch.ops.trp.soft_argmax(x, 0.5)
    torch.testing.assert_close(lse, torch.logsumexp(0.5 * x.flatten(2), -1))
    h = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.ops.trp.soft_argmax(t, 0.5)[1], (h,))


def test_bad_inputs_raise(gen):
    x = heatmaps(2, 3, 4, 4, gen=gen)
    with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
        soft_argmax(x[0])
    with pytest.raises(ValueError, match="non-empty"):
        soft_argmax(x[:, :, :0])
    with pytest.raises(TypeError, match="floating"):
        soft_argmax(x.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        soft_argmax(x.tolist())
    with pytest.raises(ValueError, match="beta"):
        soft_argmax(x, beta=float("nan"))
    with pytest.raises(ValueError, match="beta"):
        SoftArgmax(beta="2")


@requires_native
def test_native_op_checks_preconditions(gen):
    x = heatmaps(2, 3, 4, 4, gen=gen)
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.trp.soft_argmax(x[0], 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.trp.soft_argmax(x[:, :, :, :0], 1.0)
    with pytest.raises(TypeError, match="floating"):
        torch.ops.trp.soft_argmax(x.int(), 1.0)
    coords, lse = torch.ops.trp.soft_argmax(x, 1.0)
    with pytest.raises(ValueError, match=r"grad_coords must have shape \[2, 3, 2\]"):
        torch.ops.trp.soft_argmax_backward(coords[:1], lse, x, coords, lse, 1.0)
    with pytest.raises(ValueError, match=r"logsumexp must have shape \[2, 3\]"):
        torch.ops.trp.soft_argmax_backward(coords, lse, x, coords, lse[:, :1], 1.0)
    with pytest.raises(TypeError, match="grad_coords must have dtype Double"):
        torch.ops.trp.soft_argmax_backward(coords.float(), lse, x, coords, lse, 1.0)


def test_module_wrapper(gen):
    x = heatmaps(2, 3, 4, 4, gen=gen)
    module = SoftArgmax(beta=3.0)
    assert "beta=3.0" in repr(module)
    torch.testing.assert_close(module(x), soft_argmax(x, beta=3.0))


@requires_native
def test_torch_compile_no_graph_break(gen):
    x = heatmaps(2, 3, 6, 5, gen=gen).requires_grad_()
    compiled = torch.compile(lambda h: soft_argmax(h, beta=2.0).sum(), fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, soft_argmax(x, beta=2.0).sum())
    out.backward()
    assert x.grad is not None


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_negative_infinity_logits(beta, gen):
    # A -inf logit seen while the running max is still -inf (element 0 on the CPU, each CUDA
    # thread's first element) gave exp(-inf - -inf) = NaN.
    x = heatmaps(2, 3, 6, 5, gen=gen)
    x[0, 0, 0, 0] = float("-inf")
    x[0, 1, :3] = float("-inf")  # the row's first 15 elements
    x[1, 2, :, ::2] = float("-inf")
    out = soft_argmax(x, beta=beta)
    assert out.isfinite().all()
    torch.testing.assert_close(out, reference.soft_argmax(x, beta), rtol=1e-12, atol=1e-12)
    h = x.clone().requires_grad_()
    weights = torch.randn(2, 3, 2, dtype=x.dtype, generator=gen)
    (soft_argmax(h, beta=beta) * weights).sum().backward()
    r = x.clone().requires_grad_()
    (reference.soft_argmax(r, beta) * weights).sum().backward()
    torch.testing.assert_close(h.grad, r.grad, rtol=1e-12, atol=1e-12)


@requires_native
def test_all_negative_infinity_row_is_nan_like_the_reference():
    x = torch.full((1, 1, 3, 3), float("-inf"), dtype=torch.float64)
    assert soft_argmax(x).isnan().all() and reference.soft_argmax(x, 1.0).isnan().all()


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_float32_statistics(dtype, gen):
    # Logits around 25: a bfloat16 logsumexp there is off by up to 1/16, which moves every
    # probability the backward recomputes by up to 6%.
    x = (heatmaps(3, 4, 12, 10, dtype=torch.float64, scale=2.0, gen=gen) + 25.0).to(dtype)
    coords, lse = torch.ops.trp.soft_argmax(x, 1.0)
    assert coords.dtype == lse.dtype == torch.float32
    exact = x.double()
    torch.testing.assert_close(
        lse.double(), torch.logsumexp(exact.flatten(2), -1), rtol=1e-6, atol=1e-5
    )
    torch.testing.assert_close(
        coords.double(), reference.soft_argmax(exact, 1.0), rtol=1e-5, atol=1e-5
    )
    grad_coords = torch.randn(3, 4, 2, generator=gen)
    grad_lse = torch.randn(3, 4, generator=gen)
    r = exact.clone().requires_grad_()
    out = reference.soft_argmax(r, 1.0)
    ref_lse = torch.logsumexp(r.flatten(2), -1)
    ((out * grad_coords.double()).sum() + (ref_lse * grad_lse.double()).sum()).backward()
    scale = r.grad.abs().max()

    def error(saved_coords, saved_lse):
        grad = torch.ops.trp.soft_argmax_backward(
            grad_coords, grad_lse, x, saved_coords, saved_lse, 1.0
        )
        assert grad.dtype == dtype
        return ((grad.double() - r.grad).abs().max() / scale).item()

    # Only the output's own rounding is left (half an ulp: 2^-9 bfloat16, 2^-12 float16).
    ulp = torch.finfo(dtype).eps
    good = error(coords, lse)
    assert good < ulp
    # The same backward fed statistics rounded to the input dtype (the bug) is several ulps off.
    assert error(coords.to(dtype).float(), lse.to(dtype).float()) > 4 * ulp > 4 * good
    # Through the Python API: coords come back in the input dtype, gradients flow.
    h = x.clone().requires_grad_()
    api = soft_argmax(h)
    assert api.dtype == dtype
    (api.float() * grad_coords).sum().backward()
    assert h.grad.dtype == dtype and h.grad.isfinite().all()


@pytest.mark.parametrize("fused", [True, False])
def test_autocast_gives_float32(fused, gen):
    from trp.ops import use_fused

    x = heatmaps(2, 3, 6, 5, dtype=torch.float32, gen=gen)
    with use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_argmax(x.bfloat16(), beta=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, reference.soft_argmax(x.bfloat16().float(), 2.0), rtol=1e-5, atol=1e-5
    )
