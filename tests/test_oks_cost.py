"""trp.ops.oks / oks_cost: parity with the eager reference and with pycocotools' computeOks,
packing, op registration, bad inputs."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from tests.conftest import requires_native
from trp.ops import COCO_KEYPOINT_SIGMAS, OKSCost, oks, oks_cost, reference


def keypoint_problem(
    sizes: list[int], *, q: int = 5, k: int = 17, dtype=torch.float64, gen: torch.Generator
) -> dict:
    """Targets around random centres; predictions near them; some keypoints invisible."""
    g = sum(sizes)
    tgt = (
        torch.rand(g, 1, 2, dtype=dtype, generator=gen) * 200
        + torch.randn(g, k, 2, dtype=dtype, generator=gen) * 15
    )
    pred = (
        torch.rand(len(sizes), q, 1, 2, dtype=dtype, generator=gen) * 200
        + torch.randn(len(sizes), q, k, 2, dtype=dtype, generator=gen) * 15
    )
    visibility = torch.randint(0, 3, (g, k), generator=gen)
    return {
        "pred_keypoints": pred,
        "tgt_keypoints": tgt,
        "tgt_visibility": visibility,
        "tgt_areas": torch.rand(g, dtype=dtype, generator=gen) * 5000 + 100,
        "tgt_offsets": torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64),
    }


def ref_args(x: dict, sigmas=COCO_KEYPOINT_SIGMAS) -> tuple:
    dtype = x["pred_keypoints"].dtype
    return (
        x["pred_keypoints"],
        x["tgt_keypoints"],
        x["tgt_visibility"].to(dtype),
        x["tgt_areas"],
        torch.as_tensor(sigmas, dtype=dtype),
        x["tgt_offsets"],
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sizes", [[3, 0, 4], [1], [0, 0]])
def test_parity(dtype, tol, sizes, gen):
    x = keypoint_problem(sizes, dtype=dtype, gen=gen)
    packed = oks(**x)
    assert packed.costs.shape == (5 * sum(sizes),)
    assert packed.costs.dtype == dtype
    torch.testing.assert_close(packed.costs, reference.oks(*ref_args(x)), rtol=tol, atol=tol)
    assert ((packed.costs >= 0) & (packed.costs <= 1)).all()


def test_packing_matches_dense_blocks(gen):
    x = keypoint_problem([2, 3, 1], gen=gen)
    blocks = oks(**x).blocks()
    offsets = x["tgt_offsets"].tolist()
    for b, block in enumerate(blocks):
        lo, hi = offsets[b], offsets[b + 1]
        single = {
            "pred_keypoints": x["pred_keypoints"][b : b + 1],
            "tgt_keypoints": x["tgt_keypoints"][lo:hi],
            "tgt_visibility": x["tgt_visibility"][lo:hi],
            "tgt_areas": x["tgt_areas"][lo:hi],
            "tgt_offsets": torch.tensor([0, hi - lo]),
        }
        torch.testing.assert_close(block, oks(**single).costs.view(5, hi - lo))


def test_known_values():
    pred = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    pred[0, 1, :, 0] = 3.0  # 3 units off in x for both keypoints
    tgt = torch.zeros(2, 2, 2, dtype=torch.float64)
    sigmas = torch.tensor([0.1, 0.2], dtype=torch.float64)
    out = oks(
        pred,
        tgt,
        torch.tensor([[2, 1], [0, 0]]),
        torch.tensor([25.0, 25.0], dtype=torch.float64),
        torch.tensor([0, 2]),
        sigmas=sigmas,
    ).blocks()[0]
    assert out[0, 0] == 1.0  # exact prediction
    expected = sum(np.exp(-9 / (2 * s) ** 2 / 25 / 2) for s in (0.1, 0.2)) / 2
    assert out[1, 0].item() == pytest.approx(expected, rel=1e-12)
    assert (out[:, 1] == 0).all()  # no visible keypoint: defined as 0


def test_matches_pycocotools_compute_oks(gen):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    x = keypoint_problem([6], q=7, gen=gen)
    x["tgt_visibility"][:, 0] = 2  # pycocotools uses a box distance when nothing is visible
    gts, dts = [], []
    for i in range(6):
        kps = torch.cat([x["tgt_keypoints"][i], x["tgt_visibility"][i, :, None].double()], 1)
        xy = x["tgt_keypoints"][i]
        x0, y0 = xy.min(0).values.tolist()
        x1, y1 = xy.max(0).values.tolist()
        gts.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "keypoints": kps.flatten().tolist(),
                "num_keypoints": int((x["tgt_visibility"][i] > 0).sum()),
                "area": float(x["tgt_areas"][i]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            }
        )
    for q in range(7):
        kps = torch.cat([x["pred_keypoints"][0, q], torch.ones(17, 1, dtype=torch.float64)], 1)
        # Descending scores keep the predictions in query order after computeOks' sort.
        dts.append({"image_id": 1, "category_id": 1, "keypoints": kps.flatten().tolist(),
                    "score": 1.0 - 0.1 * q})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": [{"id": 1, "width": 640, "height": 480}],
            "annotations": gts,
            "categories": [{"id": 1, "name": "person", "keypoints": [], "skeleton": []}],
        }
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(dts), "keypoints")
        evaluator._prepare()
        expected = torch.from_numpy(np.asarray(evaluator.computeOks(1, 1)))  # D x G
    ours = oks(**x).blocks()[0]
    assert expected.shape == ours.shape == (7, 6)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_oks_cost_and_module(gen):
    x = keypoint_problem([2, 3], gen=gen)
    values = oks(**x).costs
    torch.testing.assert_close(oks_cost(**x, weight=2.0).costs, -2.0 * values)
    module = OKSCost(weight=3.0)
    assert "weight=3.0" in repr(module)
    torch.testing.assert_close(module(**x).costs, -3.0 * values)
    with pytest.raises(ValueError, match="non-negative"):
        OKSCost(weight=-1.0)


def test_custom_sigmas_and_other_k(gen):
    x = keypoint_problem([2, 1], k=5, gen=gen)
    sigmas = torch.linspace(0.02, 0.1, 5, dtype=torch.float64)
    torch.testing.assert_close(
        oks(**x, sigmas=sigmas).costs, reference.oks(*ref_args(x, sigmas.tolist()))
    )
    with pytest.raises(ValueError, match="sigmas are required"):
        oks(**x)


def test_no_gradient(gen):
    x = keypoint_problem([2], gen=gen)
    x["pred_keypoints"].requires_grad_()
    assert not oks(**x).costs.requires_grad


def test_empty_queries(gen):
    x = keypoint_problem([2, 1], q=0, gen=gen)
    assert oks(**x).costs.shape == (0,)
    assert [b.shape for b in oks(**x).blocks()] == [(0, 2), (0, 1)]


def test_non_contiguous(gen):
    x = keypoint_problem([3, 2], gen=gen)
    nc = dict(x)
    nc["pred_keypoints"] = x["pred_keypoints"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["tgt_keypoints"] = x["tgt_keypoints"].permute(2, 1, 0).contiguous().permute(2, 1, 0)
    nc["tgt_visibility"] = x["tgt_visibility"].t().contiguous().t()
    assert not nc["pred_keypoints"].is_contiguous()
    assert not nc["tgt_keypoints"].is_contiguous()
    torch.testing.assert_close(oks(**nc).costs, oks(**x).costs)


@requires_native
def test_opcheck(gen):
    x = keypoint_problem([2, 0, 3], gen=gen)
    torch.library.opcheck(torch.ops.trp.oks, ref_args(x))
    fp32 = [t.float() if t.is_floating_point() else t for t in ref_args(x)]
    torch.library.opcheck(torch.ops.trp.oks, tuple(fp32))


def test_bad_inputs_raise(gen):
    x = keypoint_problem([2, 1], gen=gen)
    bad = [
        ({"pred_keypoints": x["pred_keypoints"][..., :1]}, ValueError, r"\[B, Q, K, 2\]"),
        ({"tgt_keypoints": x["tgt_keypoints"][:, :3]}, ValueError, r"\[G, 17, 2\]"),
        ({"tgt_visibility": x["tgt_visibility"][:2]}, ValueError, r"tgt_visibility must have"),
        ({"tgt_areas": x["tgt_areas"][None]}, ValueError, r"tgt_areas must have shape \[3\]"),
        ({"tgt_offsets": torch.tensor([0, 1, 2])}, ValueError, "end at 3"),
        ({"tgt_offsets": torch.tensor([0, 1, 3]).int()}, TypeError, "int64"),
        ({"pred_keypoints": x["pred_keypoints"].long()}, TypeError, "floating"),
        ({"tgt_keypoints": x["tgt_keypoints"].float()}, TypeError, "same dtype"),
        ({"tgt_areas": x["tgt_areas"].tolist()}, TypeError, "torch.Tensor"),
        ({"tgt_keypoints": x["tgt_keypoints"].to("meta")}, ValueError, "same device"),
    ]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            oks(**{**x, **change})
    with pytest.raises(ValueError, match=r"sigmas must have shape \[17\]"):
        oks(**x, sigmas=torch.ones(3))


@requires_native
def test_native_op_checks_preconditions(gen):
    pred, tgt, vis, areas, sigmas, offsets = ref_args(keypoint_problem([2, 1], gen=gen))
    op = torch.ops.trp.oks
    with pytest.raises(ValueError, match=r"pred_keypoints must have shape \[B, Q, K, 2\]"):
        op(pred[..., :1], tgt, vis, areas, sigmas, offsets)
    with pytest.raises(ValueError, match=r"tgt_visibility must have shape \[3, 17\]"):
        op(pred, tgt, vis[:, :2], areas, sigmas, offsets)
    with pytest.raises(ValueError, match=r"sigmas must have shape \[17\]"):
        op(pred, tgt, vis, areas, sigmas[:3], offsets)
    with pytest.raises(TypeError, match="same dtype"):
        op(pred, tgt, vis.long(), areas, sigmas, offsets)
    with pytest.raises(ValueError, match="must equal 3"):
        op(pred, tgt, vis, areas, sigmas, torch.tensor([0, 1, 2]))


@requires_native
def test_torch_compile_no_graph_break(gen):
    x = keypoint_problem([2, 3], gen=gen)
    compiled = torch.compile(lambda kw: oks_cost(**kw, weight=2.0).costs.sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x), -2.0 * oks(**x).costs.sum())
