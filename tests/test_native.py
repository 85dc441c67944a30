"""The native extension, the fused/reference switch and the fallback path."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import trp
import trp._native as native
from tests.conftest import random_boxes, requires_native


def test_version_and_lazy_subpackages():
    assert isinstance(trp.__version__, str) and trp.__version__.count(".") == 2
    assert trp.ops.box_iou is not None
    with pytest.raises(AttributeError):
        trp.no_such_thing  # noqa: B018


@requires_native
def test_ops_registered_with_cpu_kernels():
    for op in ("box_iou", "generalized_box_iou", "box_iou_backward", "match_cost"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"trp::{op}", "CPU"), op


@pytest.mark.skipif(
    os.environ.get("TRP_EXPECT_CUDA_KERNELS") != "1", reason="CUDA kernels not requested"
)
def test_every_op_has_a_cuda_kernel():
    # CI builds with TRP_CUDA=1: this proves the .cu files were compiled and registered.
    ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("trp::")]
    assert ops, "no trp ops registered"
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
    assert native.cuda_kernels_available()


def test_set_fused_switch_and_context():
    assert native.fused_enabled() is (os.environ.get("TRP_FUSED", "1") != "0")
    with native.use_fused(False):
        assert not native.fused_enabled()
        assert not native.should_use_fused(torch.zeros(1))
    with pytest.raises(TypeError):
        native.set_fused("yes")  # type: ignore[arg-type]


def test_reference_path_gives_same_result(gen):
    b1, b2 = random_boxes(6, generator=gen), random_boxes(4, generator=gen)
    fused = trp.ops.generalized_box_iou(b1, b2)
    with native.use_fused(False):
        ref = trp.ops.generalized_box_iou(b1, b2)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


def test_missing_extension_warns_once_and_falls_back(monkeypatch, gen):
    monkeypatch.setattr(native, "_LOAD_ERROR", ImportError("simulated"))
    monkeypatch.setattr(native, "_warned", False)
    b1, b2 = random_boxes(3, generator=gen), random_boxes(2, generator=gen)
    with pytest.warns(RuntimeWarning, match="fall back"):
        out = trp.ops.box_iou(b1, b2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trp.ops.box_iou(b1, b2)
    torch.testing.assert_close(out, trp.ops.reference.box_iou(b1, b2))


def test_bad_trp_fused_value_is_rejected():
    code = "import trp._native as n; n.fused_enabled()"
    env = dict(os.environ, TRP_FUSED="maybe")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "TRP_FUSED must be 0 or 1" in out.stderr


@requires_native
def test_import_trp_registers_the_ops():
    code = "import torch, trp; print(torch.ops.trp.generalized_box_iou)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "generalized_box_iou" in out.stdout


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@requires_native
def test_every_op_has_autocast_kernels():
    # The autocast contract: no caller casts or disables autocast around a trp op.
    ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("trp::")]
    assert ops
    for key in ("AutocastCPU", "AutocastCUDA"):
        missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        assert not missing, f"ops without an {key} kernel: {missing}"


@requires_native
def test_autocast_kernel_casts_to_float32_and_keeps_float64(gen):
    b1, b2 = random_boxes(5, generator=gen), random_boxes(3, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # mixed float32 / bfloat16 boxes: both cast to float32, the result float32
        out = torch.ops.trp.box_iou(b1.float(), b2.bfloat16())
        exact = torch.ops.trp.box_iou(b1, b2)  # float64 is left alone
    assert out.dtype == torch.float32 and exact.dtype == torch.float64
    want = torch.ops.trp.box_iou(b1.float(), b2.bfloat16().float())
    torch.testing.assert_close(out, want)


def test_cuda_arch_list_carries_ptx():
    # Without PTX a GPU newer than the last listed architecture finds no kernel image.
    for path, prefix in (
        ("Makefile", "export TORCH_CUDA_ARCH_LIST ?="),
        (os.path.join(".ci", "run"), "export TORCH_CUDA_ARCH_LIST="),
    ):
        with open(os.path.join(ROOT, path)) as f:
            lines = [ln for ln in f if ln.startswith(prefix)]
        assert len(lines) == 1, path
        archs = lines[0].split("=", 1)[1].strip().strip('"').split(";")
        assert archs[-1].endswith("+PTX"), (path, archs)


def test_gpu_check_without_a_device_says_so_and_fails(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0, out.stdout + out.stderr
    assert "no CUDA device is present" in out.stderr
    report = (tmp_path / "gpu_check_report.md").read_text()
    assert "FAILED" in report and "no CUDA device is present" in report
    assert '"passed": false' in (tmp_path / "gpu_check_report.json").read_text()
    # The script itself exits with its own status for "no device".
    direct = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "gpu_check.py"),
            "--report-dir",
            str(tmp_path / "direct"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert direct.returncode == 2 and "no CUDA device is present" in direct.stderr


def test_test_cuda_imports_without_hydra_or_pytest():
    # The GPU machine has no Hydra, no pycocotools and maybe no pytest.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'hydra', 'omegaconf', 'pycocotools', 'pytest'}:\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import tests.test_cuda as t\n"
        "print(t.pytest, len([n for n in vars(t) if n.startswith('test_')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("None ")


@pytest.mark.parametrize("fused", [True, False])
def test_matching_and_box_ops_under_cpu_bf16_autocast(fused, gen):
    # Head outputs come out of autocast in bfloat16, the targets are float32: the ops take them
    # as they are (no casting by the caller) and compute in float32.
    logits = torch.randn(2, 5, 4, generator=gen)
    boxes = torch.rand(2, 5, 4, generator=gen) * 0.4 + 0.2
    tgt_boxes = torch.rand(3, 4, generator=gen) * 0.4 + 0.2
    tgt_labels = torch.tensor([0, 3, 1])
    offsets = torch.tensor([0, 2, 3])
    with native.use_fused(fused):
        want = trp.ops.match_cost(
            logits.bfloat16().float(), boxes.bfloat16().float(), tgt_labels, tgt_boxes, offsets
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = trp.ops.match_cost(
                logits.bfloat16(), boxes.bfloat16(), tgt_labels, tgt_boxes, offsets
            )
            iou = trp.ops.generalized_box_iou(boxes[0].bfloat16(), tgt_boxes)
    assert got.costs.dtype == torch.float32 and iou.dtype == torch.float32
    torch.testing.assert_close(got.costs, want.costs)
    torch.testing.assert_close(
        iou, trp.ops.reference.generalized_box_iou(boxes[0].bfloat16().float(), tgt_boxes)
    )
