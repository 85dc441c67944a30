"""The CUDA kernels of trp._C against their CPU twins (``make gpu-check`` runs this file).

Every test calls the raw ``torch.ops.trp.*`` ops, never the Python API, which would fall back
to an eager reference if a kernel were missing. The CPU result is the oracle: float64/float32
inputs run the same op on the CPU; float16/bfloat16 inputs are compared against the CPU op on
the same values upcast to float32 (the kernels accumulate in float32). Backward goes through the
ops' registered autograd, i.e. the raw ``*_backward`` ops.

Runs under pytest or, on a GPU machine without pytest, under ``tools/gpu_check.py`` (every test
is a plain function without fixtures). Imports only torch and ``trp`` (which pulls in
``trp.ops`` alone: no Hydra, transformers or pycocotools). Without a CUDA device every test is
skipped; ``TRP_CUDA_TEST_DEVICE=cpu`` runs the file's own logic on the CPU (CPU against CPU,
float64/float32 only), a check of this file, not of the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

import trp  # noqa: F401  (loads trp._C: torch.ops.trp.*)
import trp._native as native

try:  # the GPU machine may have no pytest: tools/gpu_check.py runs these functions itself
    import pytest
except ImportError:  # pragma: no cover - exercised on the GPU machine
    pytest = None

DEVICE = os.environ.get("TRP_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
FLOATS = (torch.float64, torch.float32)
HALVES = (torch.bfloat16, torch.float16)
DTYPES = FLOATS + HALVES if ON_CUDA else FLOATS
# (rtol, atol) of a CUDA result against the CPU one; half results against the float32 CPU op.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def _available() -> str | None:
    if not native.native_available():
        return "trp._C is not built"
    if ON_CUDA:
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not native.cuda_kernels_available():
            return "trp._C was built without its CUDA kernels"
    return None


SKIP_REASON = _available()
if pytest is not None:
    pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(obj, device: str, dtype: torch.dtype | None = None):
    """Tensors (nested in tuples/lists) to device, float ones to dtype; the rest unchanged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    return obj


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def assert_close(got, want, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    for i, (g, w) in enumerate(zip(_outputs(got), _outputs(want))):
        assert g.device.type == DEVICE, f"{what}[{i}] is on {g.device}, expected {DEVICE}"
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if g.is_floating_point():
            scale = max(1.0, float(w.detach().abs().max())) if w.numel() else 1.0
            torch.testing.assert_close(
                g.cpu().to(w.dtype),
                w,
                rtol=rtol,
                atol=atol * scale,
                equal_nan=True,
                msg=lambda m, i=i: f"{what}[{i}] ({dtype}): {m}",
            )
        else:
            assert torch.equal(g.cpu(), w), f"{what}[{i}] differs"


def compare(
    op: Callable,
    args: Sequence,
    dtype: torch.dtype,
    *,
    grad_args: Sequence[int] = (),
    what: str,
    transform: Callable[[list], list] | None = None,
) -> list:
    """op(*args) on DEVICE in dtype against the CPU op (float32 for half dtypes); with
    grad_args, also the gradients of a fixed random weighting of the float outputs."""
    cpu_dtype = torch.float32 if dtype in HALVES else dtype
    dev_args = list(_to(args, DEVICE, dtype))
    cpu_args = list(_to(args, "cpu", cpu_dtype))
    if transform is not None:  # e.g. make an input non-contiguous on both sides
        dev_args, cpu_args = transform(dev_args), transform(cpu_args)
    for i in grad_args:
        dev_args[i] = dev_args[i].detach().requires_grad_()
        cpu_args[i] = cpu_args[i].detach().requires_grad_()
    got, want = op(*dev_args), op(*cpu_args)
    assert_close(got, want, dtype, what)
    if grad_args:
        gen = _gen(1)
        outs = [o for o in _outputs(want) if o.is_floating_point() and o.requires_grad]
        weights = [torch.rand(o.shape, generator=gen, dtype=torch.float64) for o in outs]

        def loss(out) -> torch.Tensor:
            float_outs = [o for o in _outputs(out) if o.is_floating_point() and o.requires_grad]
            return sum((o.double() * w.to(o.device)).sum() for o, w in zip(float_outs, weights))

        if outs:
            dev_grads = torch.autograd.grad(loss(got), [dev_args[i] for i in grad_args])
            cpu_grads = torch.autograd.grad(loss(want), [cpu_args[i] for i in grad_args])
            assert_close(dev_grads, cpu_grads, dtype, f"{what} grad")
    return dev_args


# ------------------------------------------------------------------ inputs of every op


def boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], 1)


def box_iou_args(n: int, m: int, seed: int = 0) -> tuple:
    gen = _gen(seed)
    return boxes(n, gen), boxes(m, gen)


def offsets(counts: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(list(counts), dtype=torch.int64).cumsum(0).tolist()])


def match_cost_args(b: int, q: int, k: int, counts: Sequence[int], seed: int = 0) -> tuple:
    gen = _gen(seed)
    g = sum(counts)
    cxcywh = torch.rand(b, q, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    tgt = torch.rand(g, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    return (
        torch.rand(b, q, k, generator=gen, dtype=torch.float64),
        cxcywh,
        torch.randint(0, k, (g,), generator=gen),
        tgt,
        offsets(counts),
        1.0,
        5.0,
        2.0,
    )


def oks_args(b: int, q: int, kp: int, counts: Sequence[int], seed: int = 0) -> tuple:
    gen = _gen(seed)
    g = sum(counts)
    return (
        torch.rand(b, q, kp, 2, generator=gen, dtype=torch.float64),
        torch.rand(g, kp, 2, generator=gen, dtype=torch.float64),
        (torch.rand(g, kp, generator=gen) < 0.7).double(),
        torch.rand(g, generator=gen, dtype=torch.float64) * 0.5 + 0.05,
        torch.rand(kp, generator=gen, dtype=torch.float64) * 0.1 + 0.02,
        offsets(counts),
    )


def ms_deform_attn_args(
    shapes: Sequence[tuple[int, int]], n: int = 2, lq: int = 5, m: int = 3, d: int = 8, p: int = 4
) -> tuple:
    gen = _gen(0)
    spatial = torch.tensor(list(shapes), dtype=torch.int64)
    areas = spatial.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s, levels = int(areas.sum()), len(shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, lq, m, levels, p, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(n, lq, m, levels * p, generator=gen, dtype=torch.float64).softmax(-1)
    return value, spatial, starts, loc, attn.view(n, lq, m, levels, p)


def point_mask_args(q: int, c: int, hw: tuple[int, int], p: int, images: int = 2) -> tuple:
    gen = _gen(0)
    embed = torch.randn(q, c, generator=gen, dtype=torch.float64)
    features = torch.randn(images, c, *hw, generator=gen, dtype=torch.float64)
    index = torch.randint(0, images, (q,), generator=gen)
    points = torch.rand(q, p, 2, generator=gen, dtype=torch.float64)
    targets = (torch.rand(q, 2 * hw[0], 2 * hw[1], generator=gen) < 0.4).double()
    return embed, features, index, points, targets


def vrt_ce_args(tokens: int, vocab: int, dim: int, patches: Sequence[int], seed: int = 0) -> tuple:
    gen = _gen(seed)
    protos_off = offsets(patches)
    hidden = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / dim**0.5
    protos = torch.randn(int(protos_off[-1]), dim, generator=gen, dtype=torch.float64) / dim**0.5
    sample = torch.randint(0, len(patches), (tokens,), generator=gen)
    own = torch.tensor(list(patches))[sample]
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    vrt = (torch.rand(tokens, generator=gen) < 0.5) & (own > 0)
    labels[vrt] = vocab + (torch.rand(tokens, generator=gen)[vrt] * own[vrt]).long()
    labels[torch.rand(tokens, generator=gen) < 0.2] = -100
    ex_off, ex_ids = [0], []
    for t in range(tokens):
        if labels[t] >= vocab:
            ex_ids += [k for k in range(int(own[t])) if k != labels[t] - vocab][:3]
        ex_off.append(len(ex_ids))
    return (
        hidden,
        weight,
        protos,
        sample,
        protos_off,
        labels,
        torch.tensor(ex_off),
        torch.tensor(ex_ids, dtype=torch.int64),
    )


OPS = torch.ops.trp


def _soft_argmax(beta: float) -> Callable:
    return lambda h: OPS.soft_argmax(h, beta)


def _vrt_ce(chunk: int) -> Callable:
    return lambda *a: OPS.vrt_linear_cross_entropy(*a, -100, chunk)


def _layers(compute_grad: bool, num_points: int = 40) -> Callable:
    return lambda e, f, i, t: OPS.point_mask_loss_layers(
        e, f, i, t, 7, num_points, num_points // 4, 3 * num_points, 2.0, 5.0, 3.0, compute_grad
    )


# ------------------------------------------------------------------ forward + backward parity


def test_box_iou():
    for dtype in DTYPES:
        for n, m in ((7, 5), (300, 37), (0, 4)):  # one block, several blocks, empty
            args = box_iou_args(n, m)
            compare(OPS.box_iou, args, dtype, grad_args=(0, 1), what=f"box_iou {n}x{m}")
            compare(OPS.generalized_box_iou, args, dtype, grad_args=(0, 1), what=f"giou {n}x{m}")


def test_match_cost():
    for dtype in DTYPES:
        for b, q, counts in ((2, 5, (3, 1)), (3, 300, (40, 0, 17)), (2, 4, (0, 0))):
            args = match_cost_args(b, q, 6, counts)
            compare(OPS.match_cost, args, dtype, what=f"match_cost {b}x{q}x{counts}")


def test_oks():
    for dtype in DTYPES:
        for b, q, counts in ((2, 5, (3, 1)), (3, 200, (30, 0, 11)), (1, 3, (0,))):
            compare(OPS.oks, oks_args(b, q, 17, counts), dtype, what=f"oks {b}x{q}x{counts}")


def test_ms_deform_attn():
    for dtype in DTYPES:
        for shapes, lq in (([(4, 6), (3, 3), (1, 1)], 5), ([(32, 40), (16, 20)], 300)):
            compare(
                OPS.ms_deform_attn,
                ms_deform_attn_args(shapes, lq=lq),
                dtype,
                grad_args=(0, 3, 4),
                what=f"ms_deform_attn lq={lq}",
            )
    empty = ms_deform_attn_args([(3, 4)], lq=0)
    compare(OPS.ms_deform_attn, empty, torch.float32, grad_args=(0, 3, 4), what="msda empty")


def test_point_mask_logits_and_loss():
    for dtype in DTYPES:
        # points per query below and above one block (the per-query reduction)
        for q, c, hw, p in ((5, 8, (6, 7), 37), (40, 32, (24, 20), 1000), (0, 8, (4, 4), 9)):
            embed, features, index, points, targets = point_mask_args(q, c, hw, p)
            compare(
                OPS.point_mask_logits,
                (embed, features, index, points),
                dtype,
                grad_args=(0, 1),
                what=f"point_mask_logits q={q} p={p}",
            )
            compare(
                OPS.point_mask_loss,
                (embed, features, index, targets, points),
                dtype,
                grad_args=(0, 1),
                what=f"point_mask_loss q={q} p={p}",
            )


def test_point_mask_loss_layers():
    # float64/float32 only: the uncertain points are chosen by ranking logits, and half-precision
    # logits rank near-ties differently from the float32 CPU oracle (other points, other loss).
    for dtype in FLOATS:
        for q, c, hw, points in ((4, 8, (6, 7), 40), (30, 16, (32, 24), 600)):
            embed, features, index, _, targets = point_mask_args(q, c, hw, 1)
            embed = torch.stack([embed, 0.5 * embed, -embed])  # L = 3 layers
            for compute_grad in (False, True):
                compare(
                    _layers(compute_grad, points),
                    (embed, features, index, targets),
                    dtype,
                    what=f"point_mask_loss_layers q={q} grad={compute_grad}",
                )


def test_soft_argmax():
    for dtype in DTYPES:
        # H * W below one block (256 threads), far above it, and 1 x 1
        for shape in ((2, 3, 5, 7), (4, 17, 64, 48), (3, 2, 1, 1), (0, 3, 4, 4)):
            gen = _gen(0)
            x = 3.0 * torch.randn(*shape, generator=gen, dtype=torch.float64)
            compare(_soft_argmax(2.0), (x,), dtype, grad_args=(0,), what=f"soft_argmax {shape}")


def test_soft_argmax_negative_infinity():
    # Each CUDA thread's first element is -inf (the running max is still -inf there): NaN before.
    x = torch.randn(2, 3, 32, 40, generator=_gen(0), dtype=torch.float64)
    flat = x.view(2, 3, -1)
    flat[:, :, :256] = float("-inf")
    flat[1, 2, ::3] = float("-inf")
    for dtype in DTYPES:
        dev = compare(_soft_argmax(1.5), (x,), dtype, grad_args=(0,), what="soft_argmax -inf")
        coords, lse = OPS.soft_argmax(dev[0].detach(), 1.5)
        assert coords.isfinite().all() and lse.isfinite().all(), dtype


def test_soft_argmax_half_statistics_are_float32():
    if not ON_CUDA:
        return
    x = (2.0 * torch.randn(3, 4, 30, 30, generator=_gen(0)) + 25.0).to(DEVICE)
    for dtype in HALVES:
        coords, lse = OPS.soft_argmax(x.to(dtype), 1.0)
        assert coords.dtype == lse.dtype == torch.float32, dtype


def test_vrt_linear_cross_entropy():
    for dtype in DTYPES:
        # one chunk shorter than a block, several chunks longer than a block, token blocks of 2
        for tokens, vocab, chunk in ((14, 23, 4096), (300, 1500, 512), (50, 300, 1 << 21)):
            args = vrt_ce_args(tokens, vocab, 16, (5, 0, 300))
            compare(_vrt_ce(chunk), args, dtype, grad_args=(0, 1, 2), what=f"vrt_ce {tokens}")
    empty = vrt_ce_args(0, 23, 16, (5, 4))
    compare(_vrt_ce(64), empty, torch.float32, grad_args=(0, 1, 2), what="vrt_ce empty")


def test_vrt_linear_cross_entropy_half_loss_is_not_negative():
    if not ON_CUDA:
        return
    args = list(vrt_ce_args(200, 800, 32, (5, 300)))
    args[0] = args[0] * 40.0  # peaked softmax: the loss of most tokens is ~0
    for dtype in HALVES:
        dev = _to(args, DEVICE, dtype)
        loss, lse = OPS.vrt_linear_cross_entropy(*dev, -100, 256)
        assert loss.dtype == lse.dtype == torch.float32
        assert bool((loss >= 0).all()), (dtype, float(loss.min()))
        want = OPS.vrt_linear_cross_entropy(*_to(dev, "cpu", torch.float64), -100, 256)[0]
        torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ layouts, compile, streams


def test_non_contiguous_inputs():
    def transposed_heatmaps(a: list) -> list:
        return [a[0].transpose(2, 3).contiguous().transpose(2, 3)]

    x = torch.randn(3, 4, 9, 6, generator=_gen(0), dtype=torch.float64)
    compare(
        _soft_argmax(1.0),
        (x,),
        torch.float32,
        grad_args=(0,),
        what="soft_argmax nc",
        transform=transposed_heatmaps,
    )

    def strided_boxes(a: list) -> list:
        return [a[0][::2], a[1].t().contiguous().t()]

    compare(
        OPS.box_iou,
        box_iou_args(40, 9),
        torch.float32,
        grad_args=(0, 1),
        what="box_iou strided",
        transform=strided_boxes,
    )

    def strided_value(a: list) -> list:
        v = a[0]
        wide = torch.cat([v, v], dim=-1)[..., : v.shape[-1]]  # stride 2D in the last dim
        return [wide, *a[1:]]

    compare(
        OPS.ms_deform_attn,
        ms_deform_attn_args([(5, 6), (2, 3)]),
        torch.float32,
        grad_args=(0, 3, 4),
        what="msda non-contiguous value",
        transform=strided_value,
    )

    def strided_features(a: list) -> list:
        return [a[0], a[1].transpose(2, 3).contiguous().transpose(2, 3), *a[2:]]

    embed, features, index, points, targets = point_mask_args(6, 8, (7, 5), 50)
    compare(
        OPS.point_mask_loss,
        (embed, features, index, targets, points),
        torch.float32,
        grad_args=(0, 1),
        what="point_mask_loss nc features",
        transform=strided_features,
    )

    def strided_hidden(a: list) -> list:
        h = a[0]
        return [torch.cat([h, h], dim=1)[:, ::2], *a[1:]]

    compare(
        _vrt_ce(64),
        vrt_ce_args(30, 50, 8, (5, 7)),
        torch.float32,
        grad_args=(0, 1, 2),
        what="vrt_ce strided hidden",
        transform=strided_hidden,
    )


def test_opcheck():
    def on_device(args: tuple, grad: Sequence[int] = ()) -> tuple:
        out = list(_to(args, DEVICE, torch.float32))
        for i in grad:
            out[i] = out[i].requires_grad_()
        return tuple(out)

    b1, b2 = box_iou_args(6, 4)
    torch.library.opcheck(OPS.box_iou, on_device((b1, b2), (0, 1)))
    torch.library.opcheck(OPS.generalized_box_iou, on_device((b1, b2), (0, 1)))
    torch.library.opcheck(OPS.match_cost, on_device(match_cost_args(2, 5, 4, (2, 3))))
    torch.library.opcheck(OPS.oks, on_device(oks_args(2, 4, 5, (2, 1))))
    torch.library.opcheck(OPS.ms_deform_attn, on_device(ms_deform_attn_args([(3, 4)]), (0, 3, 4)))
    embed, features, index, points, targets = point_mask_args(4, 6, (5, 4), 10)
    torch.library.opcheck(
        OPS.point_mask_logits, on_device((embed, features, index, points), (0, 1))
    )
    torch.library.opcheck(
        OPS.point_mask_loss, on_device((embed, features, index, targets, points), (0, 1))
    )
    for compute_grad in (False, True):
        # The raw op returns gradients only when asked (compute_grad), and autograd only then.
        layer_args = on_device(
            (torch.stack([embed, -embed]), features, index, targets), (0, 1) if compute_grad else ()
        )
        torch.library.opcheck(
            OPS.point_mask_loss_layers,
            (*layer_args, 11, 9, 6, 27, 2.0, 3.0, 4.0, compute_grad),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )
    x = torch.randn(2, 3, 5, 4, generator=_gen(0), dtype=torch.float64)
    torch.library.opcheck(OPS.soft_argmax, (*on_device((x,), (0,)), 1.5))
    torch.library.opcheck(
        OPS.vrt_linear_cross_entropy,
        (*on_device(vrt_ce_args(12, 20, 6, (4, 3)), (0, 1, 2)), -100, 8),
    )


def test_torch_compile():
    if not ON_CUDA:
        return

    def step(heatmaps: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        coords = OPS.soft_argmax(heatmaps, 2.0)[0]
        return coords.sum() + OPS.generalized_box_iou(b1, b2).sum()

    x = torch.randn(2, 3, 16, 12, generator=_gen(0)).to(DEVICE).requires_grad_()
    b1, b2 = (b.float().to(DEVICE).requires_grad_() for b in box_iou_args(8, 5))
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, b1, b2)
    out.backward()
    grads = [t.grad.clone() for t in (x, b1, b2)]
    for t in (x, b1, b2):
        t.grad = None
    eager = step(x, b1, b2)
    eager.backward()
    torch.testing.assert_close(out, eager)
    for g, t in zip(grads, (x, b1, b2)):
        torch.testing.assert_close(g, t.grad)


def test_non_default_stream():
    # The input is written on a side stream after a long sleep; a kernel launched on the legacy
    # default stream instead of the current one would read it before the copy lands.
    if not ON_CUDA:
        return
    x = 3.0 * torch.randn(8, 17, 64, 48, generator=_gen(0))
    want = OPS.soft_argmax(x, 2.0)[0]
    src = x.to(DEVICE)
    side = torch.cuda.Stream()
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        dst.copy_(src)
        coords = OPS.soft_argmax(dst, 2.0)[0]
        b1, b2 = (b.float().to(DEVICE) for b in box_iou_args(300, 200))
        iou = OPS.box_iou(b1, b2)
    side.synchronize()
    torch.testing.assert_close(coords.cpu(), want, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(iou.cpu(), OPS.box_iou(b1.cpu(), b2.cpu()), rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------ autocast and determinism


def test_autocast():
    if not ON_CUDA:
        return
    value, spatial, starts, loc, attn = _to(
        ms_deform_attn_args([(6, 5), (3, 2)]), DEVICE, torch.float32
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = OPS.ms_deform_attn(value.bfloat16(), spatial, starts, loc, attn)
        coords = OPS.soft_argmax(torch.randn(2, 3, 8, 8, device=DEVICE).bfloat16(), 1.0)[0]
    assert out.dtype == torch.bfloat16 and coords.dtype == torch.float32
    want = OPS.ms_deform_attn(value.bfloat16().float(), spatial, starts, loc, attn)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


def _error_of(fn: Callable[[], object], types=(RuntimeError,)) -> str | None:
    """The message fn raised (one of types), or None when it returned (pytest-free)."""
    try:
        fn()
    except types as exc:
        return str(exc)
    return None


def _expect_nondeterministic_alert(fn: Callable[[], object], name: str) -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        message = _error_of(fn)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert message is not None, f"{name} did not raise under use_deterministic_algorithms(True)"
    assert name in message, message


def test_deterministic_algorithms():
    if not ON_CUDA:
        return
    value, spatial, starts, loc, attn = _to(ms_deform_attn_args([(6, 5)]), DEVICE, torch.float32)
    value.requires_grad_()
    _expect_nondeterministic_alert(
        lambda: OPS.ms_deform_attn(value, spatial, starts, loc, attn).sum().backward(),
        "trp::ms_deform_attn CUDA backward",
    )
    embed, features, index, points, targets = _to(
        point_mask_args(5, 8, (6, 6), 20), DEVICE, torch.float32
    )
    embed.requires_grad_()
    _expect_nondeterministic_alert(
        lambda: OPS.point_mask_logits(embed, features, index, points).sum().backward(),
        "trp::point_mask CUDA backward",
    )
    _expect_nondeterministic_alert(
        lambda: _layers(True)(embed.detach()[None], features, index, targets),
        "trp::point_mask_loss_layers CUDA backward",
    )
    # Kernels without float atomics run under the flag.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
        OPS.soft_argmax(x, 1.0)[0].sum().backward()
        args = list(_to(vrt_ce_args(20, 30, 8, (4, 5)), DEVICE, torch.float32))
        args[0].requires_grad_()
        OPS.vrt_linear_cross_entropy(*args, -100, 16)[0].sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_point_mask_grad_embed_is_reproducible():
    # grad_embed is a batched GEMM now (it was float atomics from every (query, point) thread).
    if not ON_CUDA:
        return
    embed, features, index, points, _ = _to(
        point_mask_args(64, 32, (32, 32), 2000), DEVICE, torch.float32
    )
    grads = []
    for _ in range(2):
        e = embed.clone().requires_grad_()
        OPS.point_mask_logits(e, features, index, points).square().sum().backward()
        grads.append(e.grad)
    assert torch.equal(grads[0], grads[1])


def test_bad_inputs_raise_on_device():
    if not ON_CUDA:
        return
    b = boxes(4, _gen(0)).float()
    for call, match in (
        (lambda: OPS.box_iou(b.to(DEVICE), b), "same device"),
        (lambda: OPS.soft_argmax(torch.zeros(2, 3, 4, device=DEVICE), 1.0), "4-D"),
    ):
        message = _error_of(call, (RuntimeError, ValueError, TypeError))
        assert message is not None and match in message, (match, message)
