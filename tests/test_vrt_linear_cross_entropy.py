"""trp.ops.vrt_linear_cross_entropy: fused bound-vocabulary cross-entropy vs the eager reference."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_native
from trp.ops import VRTLinearCrossEntropy, reference, use_fused, vrt_linear_cross_entropy

V, D = 23, 6
PATCHES = [5, 0, 9]  # sample 1 has no image


def make(dtype=torch.float64, tokens=14, seed=0, exclusions=True, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(PATCHES).cumsum(0).tolist()])
    hidden = torch.randn(tokens, D, dtype=dtype, generator=gen)
    weight = torch.randn(V, D, dtype=dtype, generator=gen)
    protos = torch.randn(int(offsets[-1]), D, dtype=dtype, generator=gen)
    sample = torch.randint(0, 3, (tokens,), generator=gen)
    own = torch.tensor(PATCHES)[sample]
    labels = torch.randint(0, V, (tokens,), generator=gen)
    vrt = (torch.rand(tokens, generator=gen) < 0.5) & (own > 0)
    labels[vrt] = V + (torch.rand(tokens, generator=gen)[vrt] * own[vrt]).long()
    labels[torch.rand(tokens, generator=gen) < 0.2] = -100
    ex_off, ex_ids = [0], []
    for t in range(tokens):
        if exclusions and labels[t] >= V:
            others = [k for k in range(int(own[t])) if k != labels[t] - V][:3]
            ex_ids += others
        ex_off.append(len(ex_ids))
    tensors = [hidden, weight, protos]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return (
        *tensors,
        sample,
        offsets,
        labels,
        torch.tensor(ex_off),
        torch.tensor(ex_ids, dtype=torch.long),
    )


def loss_of(args, **kw):
    h, w, p, s, o, lab, eo, ei = args
    return vrt_linear_cross_entropy(h, w, p, s, o, lab, exclude_offsets=eo, exclude_ids=ei, **kw)


@requires_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk_size", [4, 4096, 1 << 21])  # many chunks / one / token blocks of 2
def test_parity_forward_backward(dtype, tol, chunk_size):
    args = make(dtype, requires_grad=True)
    fused = loss_of(args, reduction="none", chunk_size=chunk_size)
    weights = torch.rand(fused.shape[0], dtype=dtype)
    (fused * weights).sum().backward()
    grads = [t.grad.clone() for t in args[:3]]
    for t in args[:3]:
        t.grad = None
    ref = reference.vrt_linear_cross_entropy(*args)
    (ref * weights).sum().backward()
    torch.testing.assert_close(fused, ref, atol=tol, rtol=tol)
    for g, t in zip(grads, args[:3]):
        torch.testing.assert_close(g, t.grad, atol=tol, rtol=tol)
    assert bool((fused[args[5] == -100] == 0).all())
    assert bool(torch.isfinite(fused).all())


@requires_native
def test_exclusions_change_the_loss():
    args = make(exclusions=True)
    with_ex = loss_of(args, reduction="none")
    without = vrt_linear_cross_entropy(*args[:6], reduction="none")
    vrt = args[5] >= V
    has_ex = (args[6][1:] - args[6][:-1]) > 0
    assert bool((with_ex[has_ex] < without[has_ex]).all())
    torch.testing.assert_close(with_ex[~vrt], without[~vrt])


@requires_native
def test_reductions_and_module():
    args = make()
    per = loss_of(args, reduction="none")
    n = int((args[5] != -100).sum())
    torch.testing.assert_close(loss_of(args, reduction="sum"), per.sum())
    torch.testing.assert_close(loss_of(args), per.sum() / n)
    module = VRTLinearCrossEntropy(chunk_size=8)
    torch.testing.assert_close(module(*args), per.sum() / n)
    with use_fused(False):
        torch.testing.assert_close(loss_of(args), per.sum() / n)


@requires_native
def test_gradcheck():
    args = make(tokens=6, requires_grad=True)

    def f(h, w, p):
        return loss_of((h, w, p, *args[3:]), reduction="none", chunk_size=5)

    assert torch.autograd.gradcheck(f, args[:3])


@requires_native
def test_opcheck():
    args = make(tokens=8, requires_grad=True)
    torch.library.opcheck(torch.ops.trp.vrt_linear_cross_entropy, (*args, -100, 7))
    detached = [a.detach() for a in args]
    loss, lse = torch.ops.trp.vrt_linear_cross_entropy(*detached, -100, 7)
    grad = torch.rand_like(loss)
    torch.library.opcheck(
        torch.ops.trp.vrt_linear_cross_entropy_backward, (grad, *detached, lse, -100, 7)
    )


@requires_native
def test_compile_no_graph_break():
    args = make(tokens=8)

    def f(*a):
        return torch.ops.trp.vrt_linear_cross_entropy(*a, -100, 16)[0].sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args))


@pytest.mark.parametrize("fused", [True, False])
def test_empty_and_all_ignored(fused):
    with use_fused(fused):
        args = make(tokens=0, requires_grad=True)
        loss = loss_of(args)
        assert loss.item() == 0
        loss.backward()
        assert args[1].grad.abs().sum() == 0
        args = make(tokens=5, requires_grad=True)
        args[5].fill_(-100)
        loss = loss_of(args)
        assert loss.item() == 0
        loss.backward()
        assert args[0].grad.abs().sum() == 0
        assert args[2].grad.abs().sum() == 0


@requires_native
def test_non_contiguous_inputs():
    args = make()
    weight_t = args[1].T.contiguous().T  # same values, column-major
    hidden_nc = torch.cat([args[0], args[0]], dim=1)[:, :D]
    other = (hidden_nc, weight_t, *args[2:])
    torch.testing.assert_close(loss_of(other, reduction="none"), loss_of(args, reduction="none"))


@pytest.mark.parametrize("raw", [False, pytest.param(True, marks=requires_native)])
def test_bad_inputs(raw):
    args = list(make())

    def call(a):
        if raw:
            return torch.ops.trp.vrt_linear_cross_entropy(*a, -100, 64)
        return loss_of(a)

    cases = []
    bad = list(args)
    bad[5] = args[5].clone()
    bad[5][(args[3] == 1).nonzero()[0, 0]] = V  # sample 1 has no patches
    cases.append((bad, ValueError, "labels"))
    bad = list(args)
    bad[3] = args[3].clone().fill_(3)
    cases.append((bad, ValueError, "sample_index"))
    bad = list(args)
    vrt_token = int((args[5] >= V).nonzero()[0, 0])
    ids = args[7].clone()
    ids[args[6][vrt_token]] = args[5][vrt_token] - V  # every VRT label has exclusions
    bad[7] = ids
    cases.append((bad, ValueError, "exclude_ids"))
    bad = list(args)
    bad[1] = args[1][:, :3]
    cases.append((bad, ValueError, "text_weight"))
    bad = list(args)
    bad[5] = args[5].int()
    cases.append((bad, TypeError, "labels"))
    bad = list(args)
    bad[4] = torch.tensor([0, 5, 3, 14])
    cases.append((bad, ValueError, "proto_offsets"))
    bad = list(args)
    bad[2] = args[2].float()
    cases.append((bad, TypeError, "dtype"))
    for a, exc, match in cases:
        with pytest.raises(exc, match=match):
            call(a)
    with pytest.raises(ValueError, match="reduction"):
        loss_of(args, reduction="avg")
    with pytest.raises(ValueError, match="go together"):
        vrt_linear_cross_entropy(*args[:6], exclude_ids=args[7])


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [4, 1 << 21])  # many chunks / token blocks of 2
def test_half_inputs_accumulate_in_float32(dtype, chunk_size):
    # Peaked logits: most tokens' loss is ~0. A half-precision logits buffer rounds their
    # logsumexp by up to 2^-9 of ~50 while the label logit is an exact dot product, so the loss
    # came out negative; half gradient sums over the token blocks drifted likewise.
    args = list(make(torch.float64, tokens=40, exclusions=False))
    args[0] = args[0] * 3.0
    args[1] = args[1] * 3.0
    args = [t.to(dtype) if t.is_floating_point() else t for t in args]
    exact = [t.double().requires_grad_() if t.is_floating_point() else t for t in args]
    half = [t.clone().requires_grad_() if t.is_floating_point() else t for t in args]
    raw = torch.ops.trp.vrt_linear_cross_entropy(*half, -100, chunk_size)
    assert raw[0].dtype == raw[1].dtype == torch.float32
    ref = reference.vrt_linear_cross_entropy(*exact)
    active = args[5] != -100
    assert bool((raw[0][active] >= 0).all()), raw[0].min()
    torch.testing.assert_close(raw[0].double(), ref.detach(), rtol=1e-5, atol=1e-4)
    weights = torch.rand(ref.shape[0], dtype=torch.float64)
    (ref * weights).sum().backward()
    (raw[0] * weights.float()).sum().backward()
    for got, want in zip(half[:3], exact[:3]):
        assert got.grad.dtype == dtype
        # Only the final rounding to the input dtype is left.
        scale = want.grad.abs().max()
        err = ((got.grad.double() - want.grad).abs().max() / scale).item()
        assert err < torch.finfo(dtype).eps, err
    # The Python API returns the input dtype outside autocast and float32 under it.
    assert loss_of(args).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_of(args).dtype == torch.float32


@pytest.mark.parametrize("fused", [True, False])
def test_autocast_mixed_dtypes(fused):
    # Under autocast the LM hands bfloat16 hidden states next to the float32 LM-head weight.
    args = list(make(torch.float32))
    expected = loss_of([args[0].bfloat16().float(), *args[1:]])
    args[0] = args[0].bfloat16()
    with use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(args)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
