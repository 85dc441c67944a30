"""Object keypoint similarity between predicted and target keypoints (``torch.ops.trp.oks``).

Per image, each of the Q predictions is scored against that image's own targets only, packed like
:func:`trp.ops.match_cost` (image b's [Q, G_b] block starts at ``Q * offsets[b]``). The value is
pycocotools' ``COCOeval.computeOks``::

    e = d² / (2σ)² / (area + eps) / 2,   eps = np.spacing(1)
    OKS = Σ_{visible} exp(−e) / #visible,  visible: v > 0

One difference: a target with no visible keypoint has OKS 0 here (pycocotools scores it by the
distance to its box, which needs the box). Matching costs are never differentiated: no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import (
    call_reference,
    check_floating,
    check_offsets,
    check_same,
    check_tensor,
    check_values_here,
    float_dtype,
)
from trp.ops.match_cost import PackedCost

__all__ = ["COCO_KEYPOINT_SIGMAS", "OKSCost", "oks", "oks_cost"]

# nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles (pycocotools' kpt_oks_sigmas)
COCO_KEYPOINT_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip


def _prepare(
    pred_keypoints: Tensor,
    tgt_keypoints: Tensor,
    tgt_visibility: Tensor,
    tgt_areas: Tensor,
    tgt_offsets: Tensor,
    sigmas: Tensor | None,
) -> tuple[Tensor, ...]:
    pred_keypoints = check_floating(pred_keypoints, "pred_keypoints")
    if pred_keypoints.dim() != 4 or pred_keypoints.shape[-1] != 2:
        raise ValueError(
            f"pred_keypoints must have shape [B, Q, K, 2], got {list(pred_keypoints.shape)}"
        )
    num_images, _, k, _ = pred_keypoints.shape
    tgt_keypoints = check_floating(tgt_keypoints, "tgt_keypoints")
    if tgt_keypoints.dim() != 3 or tgt_keypoints.shape[1:] != (k, 2):
        raise ValueError(
            f"tgt_keypoints must have shape [G, {k}, 2], got {list(tgt_keypoints.shape)}"
        )
    g = tgt_keypoints.shape[0]
    check_tensor(tgt_visibility, "tgt_visibility")
    if tgt_visibility.shape != (g, k):
        raise ValueError(
            f"tgt_visibility must have shape [{g}, {k}], got {list(tgt_visibility.shape)}"
        )
    check_tensor(tgt_areas, "tgt_areas")
    if tgt_areas.shape != (g,):
        raise ValueError(f"tgt_areas must have shape [{g}], got {list(tgt_areas.shape)}")
    if sigmas is None:
        if k != len(COCO_KEYPOINT_SIGMAS):
            raise ValueError(f"sigmas are required for K = {k} keypoints (COCO's are for 17)")
        sigmas = torch.tensor(COCO_KEYPOINT_SIGMAS, dtype=torch.float64)
    check_tensor(sigmas, "sigmas")
    if sigmas.shape != (k,):
        raise ValueError(f"sigmas must have shape [{k}], got {list(sigmas.shape)}")
    # Reading the offsets' values cannot be traced by torch.compile and is a host sync on CUDA;
    # the native op checks them itself, so only the reference path checks them here.
    if not torch.compiler.is_compiling() and check_values_here(
        pred_keypoints, should_use_fused(pred_keypoints)
    ):
        check_offsets(tgt_offsets, num_images, g, "tgt_offsets")
    check_same({"pred_keypoints": pred_keypoints, "tgt_keypoints": tgt_keypoints})
    check_same(
        {
            "pred_keypoints": pred_keypoints,
            "tgt_visibility": tgt_visibility,
            "tgt_areas": tgt_areas,
        },
        dtype=False,
    )
    options = {"dtype": float_dtype(pred_keypoints), "device": pred_keypoints.device}
    return (
        pred_keypoints.detach(),
        tgt_keypoints.detach(),
        tgt_visibility.detach().to(**options),
        tgt_areas.detach().to(**options),
        sigmas.detach().to(**options),
        tgt_offsets.to(pred_keypoints.device),
    )


def oks(
    pred_keypoints: Tensor,
    tgt_keypoints: Tensor,
    tgt_visibility: Tensor,
    tgt_areas: Tensor,
    tgt_offsets: Tensor,
    *,
    sigmas: Tensor | None = None,
) -> PackedCost:
    """OKS of each image's predictions against its own targets.

    Args:
        pred_keypoints (Tensor[B, Q, K, 2]): (x, y), in the units of the targets (e.g. pixels).
        tgt_keypoints (Tensor[G, K, 2]): (x, y), image-major.
        tgt_visibility (Tensor[G, K]): COCO v flags (0, 1, 2); v > 0 counts.
        tgt_areas (Tensor[G]): object areas (segment area in COCO), in squared target units.
        tgt_offsets (Tensor[B + 1], int64): image b owns targets ``offsets[b]:offsets[b+1]``.
        sigmas (Tensor[K], optional): per-keypoint sigmas; COCO's 17 by default.
    Returns:
        :class:`PackedCost` of OKS values in [0, 1] (``Tensor[Q * G]``); never differentiable.
    """
    args = _prepare(pred_keypoints, tgt_keypoints, tgt_visibility, tgt_areas, tgt_offsets, sigmas)
    pred, tgt, vis, areas, sig, offsets = args
    with torch.no_grad():
        if should_use_fused(pred):
            values = torch.ops.trp.oks(pred, tgt, vis, areas, sig, offsets)
        else:
            values = call_reference(reference.oks, pred, tgt, vis, areas, sig, offsets)
    return PackedCost(costs=values, offsets=tgt_offsets, num_queries=pred.shape[1])


def oks_cost(
    pred_keypoints: Tensor,
    tgt_keypoints: Tensor,
    tgt_visibility: Tensor,
    tgt_areas: Tensor,
    tgt_offsets: Tensor,
    *,
    sigmas: Tensor | None = None,
    weight: float = 1.0,
) -> PackedCost:
    """Matching cost ``−weight · OKS`` (the form of match_cost's ``−weight_giou · GIoU``).

    Args as :func:`oks`. Returns :class:`PackedCost` holding ``Tensor[Q * G]``.
    """
    if weight < 0:
        raise ValueError(f"weight must be non-negative, got {weight}")
    packed = oks(
        pred_keypoints, tgt_keypoints, tgt_visibility, tgt_areas, tgt_offsets, sigmas=sigmas
    )
    return PackedCost(
        costs=packed.costs * -weight, offsets=packed.offsets, num_queries=packed.num_queries
    )


class OKSCost(nn.Module):
    """Module form of :func:`oks_cost` holding the weight and the sigmas (COCO's by default)."""

    sigmas: Tensor

    def __init__(self, *, weight: float = 1.0, sigmas: Tensor | None = None) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be non-negative, got {weight}")
        self.weight = weight
        sigmas = (
            torch.tensor(COCO_KEYPOINT_SIGMAS, dtype=torch.float64) if sigmas is None else sigmas
        )
        if not isinstance(sigmas, Tensor) or sigmas.dim() != 1:
            raise ValueError("sigmas must be a 1-D tensor [K]")
        self.register_buffer("sigmas", sigmas.clone(), persistent=False)

    def forward(
        self,
        pred_keypoints: Tensor,
        tgt_keypoints: Tensor,
        tgt_visibility: Tensor,
        tgt_areas: Tensor,
        tgt_offsets: Tensor,
    ) -> PackedCost:
        return oks_cost(
            pred_keypoints,
            tgt_keypoints,
            tgt_visibility,
            tgt_areas,
            tgt_offsets,
            sigmas=self.sigmas,
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, num_keypoints={self.sigmas.numel()}"


def _register() -> None:
    @torch.library.register_fake("trp::oks")
    def _(pred_keypoints, tgt_keypoints, tgt_visibility, tgt_areas, sigmas, tgt_offsets):
        return pred_keypoints.new_empty((pred_keypoints.shape[1] * tgt_keypoints.shape[0],))


if native_available():
    _register()
