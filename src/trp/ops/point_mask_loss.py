"""Mask2Former's point-sampled mask losses without full-resolution mask logits
(``torch.ops.trp.point_mask_loss`` and ``torch.ops.trp.point_mask_logits``).

Mask2Former computes ``mask_logits = einsum("qc,bchw->bqhw")`` for every matched query and then
reads them at ``P = 12544`` points. Bilinear sampling is linear, so the logit at a point equals
``embed[q] . bilinear(pixel_features[b], point)``: the fused op never builds the [Q, H, W] logits
(the CPU kernel projects a small chunk of queries at a time, the CUDA kernel goes point by point).

Per query, with logits ``l`` and targets ``t`` sampled at the same normalised points
(``grid_sample``, align_corners=False, zero padding, as Mask2Former's ``point_sample``):

* ``loss_mask`` = mean over points of ``BCE_with_logits(l, t)``;
* ``loss_dice`` = ``1 - (2 Σ σ(l) t + 1) / (Σ σ(l) + Σ t + 1)``;

both summed over queries and divided by ``num_masks``. Points come from :func:`sample_points`
(uncertainty-based importance sampling) unless given. Gradients flow to ``mask_embed`` and
``pixel_features``; targets and points get none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import (
    call_reference,
    check_floating,
    check_same,
    check_tensor,
    check_values_here,
    float_dtype,
)

__all__ = [
    "PointMaskLoss",
    "point_mask_logits",
    "point_mask_loss",
    "point_mask_loss_layers",
    "point_mask_loss_per_query",
    "sample_points",
]


def _check_features(
    mask_embed: Tensor, pixel_features: Tensor, image_index: Tensor, *, values: bool = True
) -> None:
    """Shapes, dtypes, devices; and the index range when ``values`` (not in the fake kernels)."""
    check_floating(mask_embed, "mask_embed")
    check_floating(pixel_features, "pixel_features")
    check_tensor(image_index, "image_index")
    if mask_embed.dim() != 2:
        raise ValueError(f"mask_embed must have shape [Q, C], got {list(mask_embed.shape)}")
    if pixel_features.dim() != 4 or pixel_features.shape[1] != mask_embed.shape[1]:
        raise ValueError(
            f"pixel_features must have shape [B, C, H, W] with C = {mask_embed.shape[1]}, got "
            f"{list(pixel_features.shape)}"
        )
    if pixel_features.shape[2] == 0 or pixel_features.shape[3] == 0:
        raise ValueError(
            f"pixel_features must have a non-empty H x W grid, got {list(pixel_features.shape)}"
        )
    check_same({"mask_embed": mask_embed, "pixel_features": pixel_features})
    if image_index.dtype != torch.int64 or image_index.shape != mask_embed.shape[:1]:
        raise ValueError(
            f"image_index must be int64 of shape [{mask_embed.shape[0]}], got "
            f"{image_index.dtype} {list(image_index.shape)}"
        )
    check_same({"mask_embed": mask_embed, "image_index": image_index}, dtype=False)
    num_images = pixel_features.shape[0]
    # A value check reads data, which torch.compile cannot trace and which is a host sync on
    # CUDA: the native op makes it itself, so only the reference path checks here.
    if (
        values
        and not torch.compiler.is_compiling()
        and check_values_here(mask_embed, should_use_fused(mask_embed))
        and image_index.numel()
        and (int(image_index.min()) < 0 or int(image_index.max()) >= num_images)
    ):
        raise ValueError(f"image_index must lie in [0, {num_images})")


def _check_points(mask_embed: Tensor, points: Tensor) -> None:
    check_floating(points, "points")
    if points.dim() != 3 or points.shape[0] != mask_embed.shape[0] or points.shape[2] != 2:
        raise ValueError(
            f"points must have shape [Q, P, 2] with Q = {mask_embed.shape[0]}, got "
            f"{list(points.shape)}"
        )
    check_same({"mask_embed": mask_embed, "points": points})


def _check_targets(mask_embed: Tensor, target_masks: Tensor) -> Tensor:
    """Targets as a floating tensor of mask_embed's dtype (bool/integer masks are converted)."""
    check_tensor(target_masks, "target_masks")
    if target_masks.dim() != 3 or target_masks.shape[0] != mask_embed.shape[0]:
        raise ValueError(
            f"target_masks must have shape [Q, Ht, Wt] with Q = {mask_embed.shape[0]}, got "
            f"{list(target_masks.shape)}"
        )
    if target_masks.shape[1] == 0 or target_masks.shape[2] == 0:
        raise ValueError(
            f"target_masks must have a non-empty Ht x Wt grid, got {list(target_masks.shape)}"
        )
    check_same({"mask_embed": mask_embed, "target_masks": target_masks}, dtype=False)
    return target_masks.to(float_dtype(mask_embed))


def point_mask_logits(
    mask_embed: Tensor, pixel_features: Tensor, image_index: Tensor, points: Tensor
) -> Tensor:
    """Mask logits of each query at its points, without the [Q, H, W] logit maps.

    Args:
        mask_embed (Tensor[Q, C]): mask embedding of each query.
        pixel_features (Tensor[B, C, H, W]): per-pixel embeddings of the B images.
        image_index (Tensor[Q], int64): image of each query.
        points (Tensor[Q, P, 2]): (x, y) in [0, 1]; points outside sample zero padding.
    Returns:
        Tensor[Q, P]; differentiable in ``mask_embed`` and ``pixel_features``.
    """
    _check_features(mask_embed, pixel_features, image_index)
    _check_points(mask_embed, points)
    if should_use_fused(mask_embed):
        return torch.ops.trp.point_mask_logits(mask_embed, pixel_features, image_index, points)
    return call_reference(
        reference.point_mask_logits, mask_embed, pixel_features, image_index, points
    )


def sample_points(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former's uncertainty-based importance sampling of points, ``-> Tensor[Q, P, 2]``.

    Draws ``int(num_points * oversample_ratio)`` uniform points, keeps the
    ``int(importance_sample_ratio * num_points)`` whose logit is most uncertain (smallest
    ``|logit|``, computed by the fused sampling without gradient) and adds uniform points up to
    ``num_points``. ``generator`` makes the draw deterministic.
    """
    _check_features(mask_embed, pixel_features, image_index)
    if not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got {num_points!r}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must lie in [0, 1], got {importance_sample_ratio}"
        )
    num_queries = mask_embed.shape[0]
    options = {"dtype": float_dtype(mask_embed), "device": mask_embed.device}
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(num_queries, num_sampled, 2, generator=generator, **options)
    with torch.no_grad():
        logits = point_mask_logits(
            mask_embed.detach(), pixel_features.detach(), image_index, candidates
        )  # Q x kP
    chosen = torch.topk(-logits.abs(), k=num_uncertain, dim=1).indices  # Q x P_uncertain
    points = torch.gather(candidates, 1, chosen[:, :, None].expand(-1, -1, 2))
    uniform = torch.rand(num_queries, num_points - num_uncertain, 2, generator=generator, **options)
    return torch.cat([points, uniform], dim=1)


def point_mask_loss_per_query(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    target_masks: Tensor,
    points: Tensor,
) -> Tensor:
    """Per-query losses at given points, ``-> Tensor[Q, 2]`` (mean sigmoid-CE, dice).

    Args as :func:`point_mask_loss`, plus ``points (Tensor[Q, P, 2])``, P >= 1.
    """
    _check_features(mask_embed, pixel_features, image_index)
    _check_points(mask_embed, points)
    if points.shape[1] == 0:
        raise ValueError("points must hold at least one point per query")
    targets = _check_targets(mask_embed, target_masks)
    points = points.detach()
    if should_use_fused(mask_embed):
        return torch.ops.trp.point_mask_loss(
            mask_embed, pixel_features, image_index, targets, points
        )
    return call_reference(
        reference.point_mask_loss, mask_embed, pixel_features, image_index, targets, points
    )


def point_mask_loss(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    target_masks: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    num_masks: float | Tensor | None = None,
    points: Tensor | None = None,
) -> dict[str, Tensor]:
    """Mask2Former's mask losses (sigmoid-CE and dice at sampled points) of matched queries.

    Args:
        mask_embed (Tensor[Q, C]): mask embedding of each matched query.
        pixel_features (Tensor[B, C, H, W]): per-pixel embeddings; the logit map of query q is
            ``mask_embed[q] . pixel_features[image_index[q]]`` (never materialised).
        image_index (Tensor[Q], int64): image of each query.
        target_masks (Tensor[Q, Ht, Wt]): binary target of each query, float or bool, at any
            resolution (points are normalised, so they address both grids).
        num_points, oversample_ratio, importance_sample_ratio, generator: see
            :func:`sample_points`; ignored when ``points`` is given.
        num_masks: normaliser of the summed losses (default ``max(Q, 1)``).
        points (Tensor[Q, P, 2], optional): (x, y) in [0, 1] to use instead of sampling, e.g.
            the matcher's.
    Returns:
        ``{"loss_mask": Tensor[], "loss_dice": Tensor[]}``.
    """
    _check_features(mask_embed, pixel_features, image_index)
    if points is None:
        points = sample_points(
            mask_embed,
            pixel_features,
            image_index,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            generator=generator,
        )
    per_query = point_mask_loss_per_query(
        mask_embed, pixel_features, image_index, target_masks, points
    )  # Q x 2
    if num_masks is None:
        num_masks = max(mask_embed.shape[0], 1)
    total = per_query.sum(0) / num_masks
    return {"loss_mask": total[0], "loss_dice": total[1]}


def _check_sampling(num_points: int, oversample_ratio: float, importance_sample_ratio: float):
    if not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got {num_points!r}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must lie in [0, 1], got {importance_sample_ratio}"
        )


def point_mask_loss_layers(
    mask_embed: Tensor,
    pixel_features: Tensor,
    image_index: Tensor,
    target_masks: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    weight_mask: float = 1.0,
    weight_dice: float = 1.0,
    num_masks: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> dict[str, Tensor]:
    """Mask2Former's mask losses of all L decoder layers in one fused call.

    The op computes ``d loss / d mask_embed`` and ``d loss / d pixel_features`` during the forward
    (the loss is a scalar) and the backward only scales them by the incoming gradient: no
    ``[Q, H, W]`` logits, no point sets kept, one feature gradient for all layers. Points are
    generated inside the op from a seed with a counter-based hash (uncertainty-based importance
    sampling as :func:`sample_points`, a different but equally distributed draw);
    :func:`trp.ops.reference.point_mask_layer_points` reproduces them.

    Args:
        mask_embed (Tensor[L, Q, C]): mask embedding of each matched query at each layer.
        pixel_features (Tensor[B, C, H, W]): per-pixel embeddings shared by the layers.
        image_index (Tensor[Q], int64): image of each query.
        target_masks (Tensor[Q, Ht, Wt]): binary target of each query, float or bool.
        num_points, oversample_ratio, importance_sample_ratio: Mask2Former's sampling
            (``int(P * oversample_ratio)`` candidates, ``int(importance_sample_ratio * P)`` kept).
        weight_mask, weight_dice: weights of the two losses in ``loss``.
        num_masks: normaliser of the summed losses (default ``max(Q, 1)``).
        generator: the seed is one int64 drawn from it (the default generator when None).
        seed (int, optional): use this seed instead of drawing one (e.g. under torch.compile).
    Returns:
        ``{"loss": Tensor[]`` = Σ_l weight_mask · loss_mask[l] + weight_dice · loss_dice[l]
        (differentiable, once: a second backward through it raises), ``"loss_mask": Tensor[L]``,
        ``"loss_dice": Tensor[L]`` (unweighted, detached)``}``.
    """
    check_floating(mask_embed, "mask_embed")
    if mask_embed.dim() != 3:
        raise ValueError(f"mask_embed must have shape [L, Q, C], got {list(mask_embed.shape)}")
    like = mask_embed[0] if mask_embed.shape[0] else mask_embed.new_empty(mask_embed.shape[1:])
    _check_features(like, pixel_features, image_index)
    targets = _check_targets(like, target_masks)
    _check_sampling(num_points, oversample_ratio, importance_sample_ratio)
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    if num_masks is None:
        num_masks = max(mask_embed.shape[1], 1)
    num_masks = float(num_masks)
    if not num_masks > 0:
        raise ValueError(f"num_masks must be positive, got {num_masks}")
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    args = (seed, num_points, num_uncertain, num_candidates)
    weights = (float(weight_mask), float(weight_dice), num_masks)
    if should_use_fused(mask_embed):
        compute_grad = torch.is_grad_enabled() and (
            mask_embed.requires_grad or pixel_features.requires_grad
        )
        total, per_layer, _, _ = torch.ops.trp.point_mask_loss_layers(
            mask_embed, pixel_features, image_index, targets, *args, *weights, compute_grad
        )
    else:
        total, per_layer = call_reference(
            reference.point_mask_loss_layers,
            mask_embed,
            pixel_features,
            image_index,
            targets,
            *args,
            *weights,
        )
        per_layer = per_layer.detach()
    return {"loss": total, "loss_mask": per_layer[:, 0], "loss_dice": per_layer[:, 1]}


class PointMaskLoss(nn.Module):
    """Module form of :func:`point_mask_loss` holding the sampling settings and loss weights.

    Returns the weighted losses ``{"loss_mask": weight_mask * ..., "loss_dice": weight_dice * ...}``
    (Mask2Former weights: 5 and 5).
    """

    def __init__(
        self,
        *,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        weight_mask: float = 1.0,
        weight_dice: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("need oversample_ratio >= 1 and importance_sample_ratio in [0, 1]")
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.weight_mask = weight_mask
        self.weight_dice = weight_dice

    def forward(
        self,
        mask_embed: Tensor,
        pixel_features: Tensor,
        image_index: Tensor,
        target_masks: Tensor,
        *,
        num_masks: float | Tensor | None = None,
        generator: torch.Generator | None = None,
        points: Tensor | None = None,
    ) -> dict[str, Tensor]:
        losses = point_mask_loss(
            mask_embed,
            pixel_features,
            image_index,
            target_masks,
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
            generator=generator,
            num_masks=num_masks,
            points=points,
        )
        return {
            "loss_mask": self.weight_mask * losses["loss_mask"],
            "loss_dice": self.weight_dice * losses["loss_dice"],
        }

    def extra_repr(self) -> str:
        return (
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"weight_mask={self.weight_mask}, weight_dice={self.weight_dice}"
        )


def _register() -> None:
    @torch.library.register_fake("trp::point_mask_logits")
    def _(mask_embed, pixel_features, image_index, points):
        _check_features(mask_embed, pixel_features, image_index, values=False)
        _check_points(mask_embed, points)
        return mask_embed.new_empty((mask_embed.shape[0], points.shape[1]))

    @torch.library.register_fake("trp::point_mask_loss")
    def _(mask_embed, pixel_features, image_index, target_masks, points):
        _check_features(mask_embed, pixel_features, image_index, values=False)
        _check_points(mask_embed, points)
        return mask_embed.new_empty((mask_embed.shape[0], 2))

    @torch.library.register_fake("trp::point_mask_logits_backward")
    def _(grad, mask_embed, pixel_features, image_index, points):
        return torch.empty_like(mask_embed), torch.empty_like(pixel_features)

    @torch.library.register_fake("trp::point_mask_loss_backward")
    def _(grad, mask_embed, pixel_features, image_index, target_masks, points):
        return torch.empty_like(mask_embed), torch.empty_like(pixel_features)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def logits_backward(ctx, grad: Tensor):
        embed, features, index, points = ctx.saved_tensors
        grad_embed, grad_features = torch.ops.trp.point_mask_logits_backward(
            grad, embed, features, index, points
        )
        return grad_embed, grad_features, None, None

    def loss_backward(ctx, grad: Tensor):
        embed, features, index, targets, points = ctx.saved_tensors
        grad_embed, grad_features = torch.ops.trp.point_mask_loss_backward(
            grad, embed, features, index, targets, points
        )
        return grad_embed, grad_features, None, None, None

    @torch.library.register_fake("trp::point_mask_loss_layers")
    def _(mask_embed, pixel_features, image_index, target_masks, *args):
        compute_grad = args[-1]
        grads = (
            (mask_embed.new_empty(mask_embed.shape), pixel_features.new_empty(pixel_features.shape))
            if compute_grad
            else (mask_embed.new_empty((0,)), pixel_features.new_empty((0,)))
        )
        return mask_embed.new_empty(()), mask_embed.new_empty((mask_embed.shape[0], 2)), *grads

    def layers_setup_context(ctx, inputs, output) -> None:
        _, per_layer, grad_embed, grad_features = output
        ctx.mark_non_differentiable(per_layer, grad_embed, grad_features)
        # The other outputs get no gradient: do not let autograd materialise zeros of their
        # shapes for the backward (a [B, C, H, W] buffer).
        ctx.set_materialize_grads(False)
        ctx.compute_grad = inputs[-1]
        ctx.used = False
        # The backward scales these in place and hands them on; once it has run the saved
        # tensors are released, so autograd can take them as .grad without a copy.
        ctx.save_for_backward(grad_embed, grad_features)

    def layers_backward(ctx, grad_total: Tensor, *_):
        if not ctx.compute_grad:
            raise RuntimeError(
                "trp::point_mask_loss_layers was called with compute_grad=False: it has no "
                "gradient to give (trp.ops.point_mask_loss_layers sets it when an input "
                "requires grad)"
            )
        if ctx.used:
            raise RuntimeError(
                "trp::point_mask_loss_layers: backward through the same loss a second time is "
                "not supported (its gradients are computed once in the forward and scaled in "
                "place); call the loss again instead of using retain_graph=True"
            )
        ctx.used = True
        grad_embed, grad_features = ctx.saved_tensors
        if type(grad_total) is Tensor and type(grad_features) is Tensor:
            # Eager: scale in place, no second [B, C, H, W] buffer.
            scale = torch.Tensor.mul_
        else:  # traced (functional/fake tensors under torch.compile): out of place
            scale = torch.mul
        return (
            scale(grad_embed, grad_total) if ctx.needs_input_grad[0] else None,
            scale(grad_features, grad_total) if ctx.needs_input_grad[1] else None,
            *([None] * 10),
        )

    torch.library.register_autograd(
        "trp::point_mask_loss_layers", layers_backward, setup_context=layers_setup_context
    )
    torch.library.register_autograd(
        "trp::point_mask_logits", logits_backward, setup_context=setup_context
    )
    torch.library.register_autograd(
        "trp::point_mask_loss", loss_backward, setup_context=setup_context
    )


if native_available():
    _register()
