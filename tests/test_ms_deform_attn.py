"""trp.ops.ms_deform_attn / MSDeformAttn: parity with the grid_sample reference (forward and all
three gradients), gradcheck, op registration, edge cases, bad inputs, the layer, torch.compile."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_native
from trp.ops import MSDeformAttn, ms_deform_attn, reference, use_fused

LEVELS = {
    "mixed": [(4, 6), (3, 3), (1, 1), (2, 5)],
    "non_square": [(7, 3), (2, 9)],
    "single_pixel": [(1, 1)],
}


def level_tensors(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial, starts


def make_inputs(
    shapes: list[tuple[int, int]],
    *,
    n: int = 2,
    lq: int = 5,
    m: int = 3,
    d: int = 4,
    p: int = 3,
    dtype: torch.dtype = torch.float64,
    gen: torch.Generator,
    low: float = -0.1,
    high: float = 1.1,
) -> tuple[torch.Tensor, ...]:
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights."""
    spatial, starts = level_tensors(shapes)
    s, num_levels = int(spatial.prod(1).sum()), len(shapes)
    value = torch.randn(n, s, m, d, dtype=dtype, generator=gen)
    loc = torch.rand(n, lq, m, num_levels, p, 2, dtype=dtype, generator=gen) * (high - low) + low
    attn = torch.rand(n, lq, m, num_levels * p, dtype=dtype, generator=gen).softmax(-1)
    return value, spatial, starts, loc, attn.view(n, lq, m, num_levels, p)


def forward_and_grads(fn, inputs, grad_out):
    value, spatial, starts, loc, attn = (t.clone() for t in inputs)
    for t in (value, loc, attn):
        t.requires_grad_()
    out = fn(value, spatial, starts, loc, attn)
    out.backward(grad_out)
    return out.detach(), value.grad, loc.grad, attn.grad


def assert_parity(inputs, gen, tol):
    n, lq = inputs[3].shape[:2]
    md = inputs[0].shape[2] * inputs[0].shape[3]
    grad_out = torch.randn(n, lq, md, dtype=inputs[0].dtype, generator=gen)
    with use_fused(True):
        ours = forward_and_grads(ms_deform_attn, inputs, grad_out)
    ref = forward_and_grads(reference.ms_deform_attn, inputs, grad_out)
    for name, a, b in zip(("output", "grad_value", "grad_loc", "grad_attn"), ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda msg, n=name: f"{n}: {msg}")


@requires_native
@pytest.mark.parametrize("levels", list(LEVELS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_parity_forward_and_gradients(levels, dtype, tol, gen):
    inputs = make_inputs(LEVELS[levels], dtype=dtype, gen=gen)
    assert_parity(inputs, gen, tol)


@requires_native
@pytest.mark.parametrize("d", [1, 3, 5, 33])
def test_parity_odd_channel_counts(d, gen):
    assert_parity(make_inputs(LEVELS["mixed"], d=d, m=2, gen=gen), gen, 1e-10)


@requires_native
def test_locations_outside_are_zero_padded(gen):
    inputs = make_inputs(LEVELS["mixed"], gen=gen, low=-0.6, high=1.6)
    loc = inputs[3].clone()
    far = torch.tensor([-1e6, -5.0, 3.0, 1e4, 1e12, -1e12], dtype=loc.dtype)
    flat = loc.view(-1)
    flat[::7] = far.repeat(flat[::7].numel() // far.numel() + 1)[: flat[::7].numel()]
    inputs = (*inputs[:3], loc, inputs[4])
    assert_parity(inputs, gen, 1e-10)
    # A query whose points all lie far outside reads nothing.
    loc_far = torch.full_like(loc, 7.0)
    out = ms_deform_attn(*inputs[:3], loc_far, inputs[4])
    assert out.abs().max() == 0


@requires_native
def test_single_point_known_value():
    # One 2 x 2 level, location at the centre of the level: the mean of the four pixels.
    value = torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1)
    spatial, starts = level_tensors([(2, 2)])
    loc = torch.tensor([0.5, 0.5], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.full((1, 1, 1, 1, 1), 2.0, dtype=torch.float64)
    out = ms_deform_attn(value, spatial, starts, loc, attn)
    assert out.item() == pytest.approx(2.0 * 1.5)
    # Pixel (x=1, y=0) centre: loc = ((1 + 0.5) / 2, 0.5 / 2).
    loc = torch.tensor([0.75, 0.25], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    assert ms_deform_attn(value, spatial, starts, loc, attn).item() == pytest.approx(2.0)


@requires_native
@pytest.mark.parametrize("d", [3, 5])
def test_gradcheck_fp64(d, gen):
    value, spatial, starts, loc, attn = make_inputs(
        [(3, 4), (2, 2), (1, 1)], n=2, lq=3, m=2, d=d, p=2, gen=gen
    )
    for t in (value, loc, attn):
        t.requires_grad_()

    def fn(v, sl, aw):
        return ms_deform_attn(v, spatial, starts, sl, aw)

    assert torch.autograd.gradcheck(fn, (value, loc, attn))


@requires_native
def test_opcheck(gen):
    inputs = make_inputs([(3, 4), (2, 2)], n=2, lq=3, m=2, d=3, p=2, gen=gen)
    value, spatial, starts, loc, attn = inputs
    args = (value.requires_grad_(), spatial, starts, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(torch.ops.trp.ms_deform_attn, args)
    fp32 = (value.detach().float(), spatial, starts, loc.detach().float(), attn.detach().float())
    torch.library.opcheck(torch.ops.trp.ms_deform_attn, fp32)


@requires_native
def test_opcheck_backward(gen):
    value, spatial, starts, loc, attn = make_inputs(
        [(3, 4), (2, 2)], n=2, lq=3, m=2, d=3, p=2, gen=gen
    )
    grad = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen)
    torch.library.opcheck(
        torch.ops.trp.ms_deform_attn_backward, (grad, value, spatial, starts, loc, attn)
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("n", "lq"), [(0, 4), (2, 0), (0, 0)])
def test_empty(fused, n, lq, gen):
    value, spatial, starts, loc, attn = make_inputs(
        LEVELS["mixed"], n=n, lq=lq, m=2, d=3, p=2, gen=gen
    )
    for t in (value, loc, attn):
        t.requires_grad_()
    with use_fused(fused):
        out = ms_deform_attn(value, spatial, starts, loc, attn)
        assert out.shape == (n, lq, 6)
        out.sum().backward()
    assert value.grad.shape == value.shape
    assert (value.grad == 0).all()
    assert loc.grad.shape == loc.shape
    assert attn.grad.shape == attn.shape


@requires_native
def test_non_contiguous(gen):
    value, spatial, starts, loc, attn = make_inputs(LEVELS["mixed"], gen=gen)
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # N x S x M x D view
    loc_nc = torch.stack([loc, loc], dim=-1)[..., 0]
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    spatial_nc = spatial.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, spatial_nc))
    inputs = (value_nc, spatial_nc, starts, loc_nc, attn_nc)
    assert_parity(inputs, gen, 1e-10)
    torch.testing.assert_close(
        ms_deform_attn(*inputs),
        reference.ms_deform_attn(value, spatial, starts, loc, attn),
        rtol=1e-12,
        atol=1e-12,
    )


def _bad_calls(good: tuple[torch.Tensor, ...]):
    value, spatial, starts, loc, attn = good
    yield (value[0], spatial, starts, loc, attn), ValueError, r"value must be 4-D"
    yield (value.long(), spatial, starts, loc, attn), TypeError, "floating"
    yield (value, spatial.int(), starts, loc, attn), TypeError, "spatial_shapes must have dtype"
    yield (value, spatial, starts.float(), loc, attn), TypeError, "level_start_index must have"
    yield (value, spatial, starts, loc.float(), attn), TypeError, "same dtype"
    yield (value, spatial, starts, loc, attn.float()), TypeError, "same dtype"
    yield (value, spatial[:, :1], starts, loc, attn), ValueError, r"spatial_shapes must have shape"
    yield (value, spatial, starts[:2], loc, attn), ValueError, r"level_start_index must have shape"
    yield (value, spatial, starts, loc[..., :1], attn), ValueError, r"\[N, Lq, M, L, P, 2\]"
    yield (value, spatial, starts, loc[:, :, :1], attn), ValueError, r"\[N, Lq, M, L, P, 2\]"
    yield (value, spatial, starts, loc, attn[..., :1]), ValueError, r"\[N, Lq, M, L, P\]"
    yield (value[:, :-1], spatial, starts, loc, attn), ValueError, r"sum\(H \* W\)"
    yield (value, spatial, starts + 1, loc, attn), ValueError, r"level_start_index\[0\] must be 0"
    swapped = spatial.flip(0)
    yield (value, swapped, starts, loc, attn), ValueError, r"level_start_index\[1\] must be"
    zero = spatial.clone()
    zero[2] = torch.tensor([0, 3])
    yield (value, zero, starts, loc, attn), ValueError, "spatial_shapes must be positive"


@pytest.mark.parametrize("fused", [True, False])
def test_bad_inputs_raise(fused, gen):
    good = make_inputs(LEVELS["mixed"], gen=gen)
    with use_fused(fused):
        for args, error, match in _bad_calls(good):
            with pytest.raises(error, match=match):
                ms_deform_attn(*args)
        value, spatial, starts, loc, attn = good
        with pytest.raises(ValueError, match="same device"):
            ms_deform_attn(value, spatial, starts, loc.to("meta"), attn)
        with pytest.raises(ValueError, match="same device"):
            ms_deform_attn(value, spatial.to("meta"), starts, loc, attn)
        with pytest.raises(TypeError, match="torch.Tensor"):
            ms_deform_attn(value, [[4, 6]], starts, loc, attn)


@requires_native
def test_native_op_checks_preconditions(gen):
    good = make_inputs(LEVELS["mixed"], gen=gen)
    op = torch.ops.trp.ms_deform_attn
    for args, error, match in _bad_calls(good):
        with pytest.raises(error, match=match):
            op(*args)
    value, spatial, starts, loc, attn = good
    with pytest.raises(TypeError, match="float32 and float64"):
        op(value.half(), spatial, starts, loc.half(), attn.half())
    out = op(value, spatial, starts, loc, attn)
    backward = torch.ops.trp.ms_deform_attn_backward
    with pytest.raises(ValueError, match=r"grad_output must have shape \[N, Lq, M \* D\]"):
        backward(out[:, :, :-1], value, spatial, starts, loc, attn)
    with pytest.raises(TypeError, match="same dtype"):
        backward(out.float(), value, spatial, starts, loc, attn)
    for args, error, match in _bad_calls(good):
        with pytest.raises(error, match=match):
            backward(out, *args)


def test_module_shapes_gradients_and_init(gen):
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    offsets = layer.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    # Head h starts along direction 2πh/M (squashed onto the square), point p at distance p + 1.
    torch.testing.assert_close(offsets[0, 1, 2], torch.tensor([3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(offsets[1, 0, 1], torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert (layer.attention_weights.weight == 0).all()
    assert "n_points=3" in repr(layer)
    # At initialisation the query does not reach the output: give it a say.
    with torch.no_grad():
        layer.sampling_offsets.weight.normal_(std=0.05)
        layer.attention_weights.weight.normal_(std=0.05)
    spatial, starts = level_tensors([(5, 4), (2, 3)])
    query = torch.randn(2, 7, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    feats = torch.randn(2, 26, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, -6:] = True
    for ref_dim in (2, 4):
        ref_points = torch.rand(2, 7, 2, ref_dim, dtype=torch.float64, generator=gen)
        with use_fused(False):
            expected = layer(query, ref_points, feats, spatial, starts, mask)
        out = layer(query, ref_points, feats, spatial, starts, mask)
        assert out.shape == (2, 7, 32)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        query.grad = feats.grad = None
        out.square().sum().backward()
        assert query.grad.abs().sum() > 0
        assert feats.grad.abs().sum() > 0
        # Padded positions contribute nothing, so their features get no gradient.
        assert (feats.grad[1, -6:] == 0).all()


def test_module_bad_inputs(gen):
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="positive"):
        MSDeformAttn(n_points=0)
    layer = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    spatial, starts = level_tensors([(3, 3)])
    query, feats = torch.randn(1, 4, 16), torch.randn(1, 9, 16)
    ref_points = torch.rand(1, 4, 1, 2)
    with pytest.raises(ValueError, match="query must have shape"):
        layer(query[..., :8], ref_points, feats, spatial, starts)
    with pytest.raises(ValueError, match="reference_points must have shape"):
        layer(query, torch.rand(1, 4, 1, 3), feats, spatial, starts)
    with pytest.raises(ValueError, match="input_flatten must have shape"):
        layer(query, ref_points, feats[..., :8], spatial, starts)
    with pytest.raises(ValueError, match="input_padding_mask"):
        layer(query, ref_points, feats, spatial, starts, torch.zeros(1, 9))
    with pytest.raises(ValueError, match=r"sum\(H \* W\)"):
        layer(query, ref_points, feats[:, :8], spatial, starts)


@requires_native
def test_torch_compile_no_graph_break(gen):
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    spatial, starts = level_tensors([(4, 4), (2, 2)])
    query = torch.randn(1, 5, 16, generator=gen)
    feats = torch.randn(1, 20, 16, generator=gen)
    ref_points = torch.rand(1, 5, 2, 2, generator=gen)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(
        compiled(query, ref_points, feats, spatial, starts),
        layer(query, ref_points, feats, spatial, starts),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_matches_cpu(dtype, tol, gen):
    inputs = make_inputs(LEVELS["mixed"], d=5, gen=gen)
    # Round to the tested dtype first so that only the kernel's own error is compared.
    inputs = tuple(t.to(dtype).double() if t.is_floating_point() else t for t in inputs)
    grad_out = torch.randn(2, 5, 15, dtype=dtype, generator=gen)
    expected = forward_and_grads(ms_deform_attn, inputs, grad_out.double())
    cuda_inputs = tuple(t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in inputs)
    got = forward_and_grads(ms_deform_attn, cuda_inputs, grad_out.cuda())
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        scale = float(b.abs().max())
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fused", [True, False])
def test_layer_under_cpu_bf16_autocast(fused, gen):
    # trainer=gpu model=tiny_vlm_deformable: under autocast value_proj hands a bfloat16 value
    # to the op next to float32 sampling locations and weights, which raised a dtype error.
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    spatial, starts = level_tensors([(6, 5), (3, 2)])
    s = int(spatial.prod(1).sum())
    query = torch.randn(2, 7, 32, generator=gen)
    ref_points = torch.rand(2, 7, 2, 2, generator=gen)
    flat = torch.randn(2, s, 32, generator=gen)
    expected = layer(query, ref_points, flat, spatial, starts)
    with use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(query, ref_points, flat, spatial, starts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name


@pytest.mark.parametrize("fused", [True, False])
def test_op_under_autocast_accepts_mixed_dtypes(fused, gen):
    value, spatial, starts, loc, attn = make_inputs(LEVELS["mixed"], dtype=torch.float32, gen=gen)
    expected = reference.ms_deform_attn(value.bfloat16().float(), spatial, starts, loc, attn)
    value = value.bfloat16().requires_grad_()
    loc.requires_grad_()
    with use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value, spatial, starts, loc, attn)
    # float32 math, output in value's dtype (as torchvision's roi_align under autocast).
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert value.grad.dtype == torch.bfloat16 and loc.grad.dtype == torch.float32
    # Outside autocast the same mixed dtypes are still an error.
    with pytest.raises(TypeError, match="same dtype"):
        ms_deform_attn(value.detach(), spatial, starts, loc.detach(), attn)


@requires_native
def test_raw_op_autocast_kernel(gen):
    value, spatial, starts, loc, attn = make_inputs(LEVELS["mixed"], dtype=torch.float32, gen=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.trp.ms_deform_attn(value.bfloat16(), spatial, starts, loc, attn)
    assert out.dtype == torch.bfloat16
    expected = torch.ops.trp.ms_deform_attn(value.bfloat16().float(), spatial, starts, loc, attn)
    torch.testing.assert_close(out, expected.bfloat16())
