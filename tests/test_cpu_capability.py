"""The CPU kernels' instruction set: chosen at load, lowered by ATEN_CPU_CAPABILITY, same results.

Each capability runs in its own subprocess (the choice is made once, when trp._C loads), computes
every fused op forward and backward on seeded inputs and writes the results as safetensors; the
test compares them across capabilities.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trp.ops import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="trp._C not built")

ORDER = ("DEFAULT", "AVX2", "AVX512")

SCRIPT = r"""
import sys
import torch
from safetensors.torch import save_file
import trp
from trp import ops

torch.manual_seed(0)
out = {}


def grads(name, tensors, result):
    if isinstance(result, (tuple, list)):
        result = sum((r * (i + 1)).sum() for i, r in enumerate(result))
    else:
        out[name] = result.detach().clone()
        # A non-uniform upstream gradient, in the result's dtype (a float32 one would bring
        # ATen's own capability-dependent rounding into the float64 comparison).
        weights = torch.linspace(-1, 1, result.numel(), dtype=result.dtype)
        result = (result * weights.view_as(result)).sum()
    for i, g in enumerate(torch.autograd.grad(result, tensors)):
        out[f"{name}.grad{i}"] = g


for dtype in (torch.float32, torch.float64):
    t = str(dtype).split(".")[-1]
    # ms_deform_attn: D = 32 (whole vectors), 20 and 3 (partial vectors)
    shapes = torch.tensor([[6, 7], [3, 4]])
    starts = torch.tensor([0, 42])
    for d in (32, 20, 3):
        value = torch.randn(2, 54, 3, d, dtype=dtype, requires_grad=True)
        loc = (torch.rand(2, 9, 3, 2, 4, 2, dtype=dtype) * 1.2 - 0.1).requires_grad_()
        attn = torch.rand(2, 9, 3, 2, 4, dtype=dtype).softmax(-1).requires_grad_()
        r = ops.ms_deform_attn(value, shapes, starts, loc, attn)
        grads(f"ms_deform_attn.{t}.{d}", (value, loc, attn), r)
    boxes = torch.rand(40, 4, dtype=dtype)
    boxes[:, 2:] += boxes[:, :2]
    b1, b2 = boxes[:25].requires_grad_(), boxes[25:].requires_grad_()
    grads(f"box_iou.{t}", (b1, b2), ops.generalized_box_iou(b1, b2))
    heat = torch.randn(2, 3, 9, 11, dtype=dtype, requires_grad=True)
    grads(f"soft_argmax.{t}", (heat,), ops.soft_argmax(heat, beta=2.0))
    hidden = torch.randn(30, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    protos = torch.randn(7, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 53, (30,))
    labels[::5] = -100
    loss = ops.vrt_linear_cross_entropy(
        hidden, weight, protos, torch.tensor([0] * 15 + [1] * 15), torch.tensor([0, 3, 7]),
        labels, reduction="none", chunk_size=16,
    )
    grads(f"vrt_linear_cross_entropy.{t}", (hidden, weight, protos), loss)
    embed = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    features = torch.randn(2, 8, 12, 10, dtype=dtype, requires_grad=True)
    masks = torch.rand(5, 24, 20) > 0.5
    points = torch.rand(5, 40, 2, dtype=dtype)
    losses = ops.point_mask_loss(
        embed, features, torch.tensor([0, 1, 1, 0, 1]), masks, points=points
    )
    grads(f"point_mask_loss.{t}", (embed, features), tuple(losses.values()))
    logits = torch.randn(2, 6, 5, dtype=dtype)
    pred_boxes = torch.rand(2, 6, 4, dtype=dtype) * 0.5 + 0.25
    tgt_boxes = torch.rand(4, 4, dtype=dtype) * 0.5 + 0.25
    out[f"match_cost.{t}"] = ops.match_cost(
        logits, pred_boxes, torch.randint(0, 5, (4,)), tgt_boxes, torch.tensor([0, 1, 4])
    ).costs
    keypoints = torch.rand(2, 6, 17, 2, dtype=dtype)
    targets = torch.rand(5, 17, 2, dtype=dtype)
    out[f"oks.{t}"] = ops.oks(
        keypoints, targets, torch.ones(5, 17, dtype=dtype), torch.rand(5, dtype=dtype) + 0.1,
        torch.tensor([0, 2, 5]),
    ).costs
out["capability"] = torch.tensor([{"DEFAULT": 0, "AVX2": 1, "AVX512": 2}[ops.cpu_capability()]])
save_file(out, sys.argv[1])
"""


def _hardware() -> str:
    """The best capability this CPU runs, from /proc/cpuinfo (what cpu_dispatch.cpp checks)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not {"avx2", "fma", "f16c"} <= flags:
        return "DEFAULT"
    return "AVX512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "AVX2"


# Only trp's choice: above what the CPU runs, ATen trusts ATEN_CPU_CAPABILITY and its own
# kernels (softmax, for one) die of an illegal instruction, so no result can be computed there.
CHOICE_ONLY = "from trp import ops; print(ops.cpu_capability())"


def _run(tmp_path: Path, requested: str) -> tuple[str, dict[str, torch.Tensor] | None]:
    """The capability trp chose under ``ATEN_CPU_CAPABILITY=requested`` and the ops' results
    (None where the CPU cannot run ``requested``: only trp's choice is checked there)."""
    path = tmp_path / f"{requested}.safetensors"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=requested.lower(), OMP_NUM_THREADS="1")
    env.pop("TRP_FUSED", None)
    runnable = ORDER.index(requested) <= ORDER.index(_hardware())
    args = [SCRIPT, str(path)] if runnable else [CHOICE_ONLY]
    proc = subprocess.run([sys.executable, "-c", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not runnable:
        return proc.stdout.strip().splitlines()[-1], None
    results = load_file(path)
    return ORDER[int(results.pop("capability"))], results


@pytest.fixture(scope="module")
def per_capability(tmp_path_factory) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    tmp = tmp_path_factory.mktemp("capability")
    return {requested: _run(tmp, requested) for requested in ORDER}


def test_capability_follows_aten_cpu_capability(per_capability):
    hardware = _hardware()
    for requested, (chosen, _) in per_capability.items():
        # The requested one, unless the CPU cannot run it (ATen trusts the variable; trp does not).
        expected = ORDER[min(ORDER.index(requested), ORDER.index(hardware))]
        assert chosen == expected, (requested, chosen, hardware)


def test_capabilities_built_on_x86_64():
    import platform

    if platform.machine().lower() not in {"x86_64", "amd64"}:
        pytest.skip("the vector builds are x86-64 only")
    chosen = torch.ops.trp_cpu.capability()
    assert chosen in ORDER
    aten = torch.backends.cpu.get_cpu_capability()
    if aten in ORDER:
        # The best set this CPU runs, unless ATen itself (or ATEN_CPU_CAPABILITY) chose less.
        assert chosen == ORDER[min(ORDER.index(_hardware()), ORDER.index(aten))]


def test_results_agree_across_capabilities(per_capability):
    _, baseline = per_capability["DEFAULT"]
    assert len(baseline) > 40
    compared = 0
    for requested in ("AVX2", "AVX512"):
        _, results = per_capability[requested]
        if results is None:  # above what this CPU runs (see _run)
            continue
        compared += 1
        assert results.keys() == baseline.keys()
        for name, expected in baseline.items():
            # Only the summation order and fused multiply-adds differ between instruction sets.
            tol = 1e-12 if expected.dtype == torch.float64 else 2e-5
            torch.testing.assert_close(
                results[name], expected, rtol=tol, atol=tol, msg=f"{requested}: {name}"
            )
    if _hardware() != "DEFAULT":
        assert compared >= 1
