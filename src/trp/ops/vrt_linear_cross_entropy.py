"""Fused LM-head cross-entropy over a bound vocabulary (``torch.ops.trp.vrt_linear_cross_entropy``).

With visual reference tokens the vocabulary of token t is the text vocabulary ⊕ the patches of
its own sample. The eager loss builds ``h @ cat(W, P).T`` — ``[T, V + ΣP]`` logits, several
copies of them in the backward — and masks other samples' patches. The fused op streams blocks of
tokens against chunks of vocabulary rows with an online log-sum-exp, so only a small
``[token block, chunk]`` buffer exists; the backward recomputes each chunk from the saved
log-sum-exp. PaDT's robust mask (``exclude_offsets`` / ``exclude_ids``) removes, at a target VRT,
the same object's other target patches from the softmax.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from trp._native import native_available, should_use_fused
from trp.ops import reference
from trp.ops._validate import (
    autocast_active,
    check_floating,
    check_offsets,
    check_same,
    check_tensor,
    check_values_here,
    fp32_inputs,
    reference_autocast,
)

__all__ = ["VRTLinearCrossEntropy", "vrt_linear_cross_entropy"]

Reduction = Literal["none", "mean", "sum"]


def _check_long(t: object, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    t = check_tensor(t, name)
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return t


def _check_metadata(
    hidden: Tensor,
    text_weight: Tensor,
    prototypes: Tensor,
    sample_index: Tensor,
    proto_offsets: Tensor,
    labels: Tensor,
    exclude_offsets: Tensor,
    exclude_ids: Tensor,
    ignore_index: int,
    chunk_size: int,
) -> None:
    check_floating(hidden, "hidden")
    check_floating(text_weight, "text_weight")
    check_floating(prototypes, "prototypes")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [T, D], got {list(hidden.shape)}")
    tokens, dim = hidden.shape
    if text_weight.dim() != 2 or text_weight.shape[1] != dim or text_weight.shape[0] < 1:
        raise ValueError(f"text_weight must have shape [V, {dim}], got {list(text_weight.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != dim:
        raise ValueError(f"prototypes must have shape [P, {dim}], got {list(prototypes.shape)}")
    # Under autocast the three are cast to float32 (Autocast kernel), so they may differ.
    check_same(
        {"hidden": hidden, "text_weight": text_weight, "prototypes": prototypes},
        dtype=not autocast_active(hidden),
    )
    _check_long(sample_index, "sample_index", (tokens,))
    _check_long(labels, "labels", (tokens,))
    _check_long(exclude_ids, "exclude_ids")
    if exclude_ids.dim() != 1:
        raise ValueError(f"exclude_ids must be 1-D, got {list(exclude_ids.shape)}")
    _check_long(proto_offsets, "proto_offsets")
    if proto_offsets.dim() != 1 or proto_offsets.shape[0] < 2:
        raise ValueError(
            f"proto_offsets must have shape [B + 1], B >= 1, got {list(proto_offsets.shape)}"
        )
    _check_long(exclude_offsets, "exclude_offsets", (tokens + 1,))
    check_same(
        {
            "hidden": hidden,
            "sample_index": sample_index,
            "proto_offsets": proto_offsets,
            "labels": labels,
            "exclude_offsets": exclude_offsets,
            "exclude_ids": exclude_ids,
        },
        dtype=False,
    )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def _check_data(
    hidden: Tensor,
    text_weight: Tensor,
    prototypes: Tensor,
    sample_index: Tensor,
    proto_offsets: Tensor,
    labels: Tensor,
    exclude_offsets: Tensor,
    exclude_ids: Tensor,
    ignore_index: int,
    chunk_size: int,
) -> None:
    """The checks that read index values (see :func:`check_values_here`: the C++ op makes the
    same checks, so on CUDA the fused path reads nothing on the host from Python)."""
    tokens = hidden.shape[0]
    samples = proto_offsets.shape[0] - 1
    check_offsets(proto_offsets, samples, prototypes.shape[0], "proto_offsets")
    check_offsets(exclude_offsets, tokens, exclude_ids.shape[0], "exclude_offsets")
    if tokens == 0:
        return
    if int(sample_index.min()) < 0 or int(sample_index.max()) >= samples:
        raise ValueError(f"sample_index must lie in [0, {samples})")
    own = (proto_offsets[1:] - proto_offsets[:-1])[sample_index]  # T
    vocab = text_weight.shape[0]
    active = labels != ignore_index
    if bool((active & ((labels < 0) | (labels >= own + vocab))).any()):
        raise ValueError(
            "labels must be ignore_index, a text id in [0, V) or a VRT id V + k with k below the "
            f"token's own patch count (V = {vocab})"
        )
    if exclude_ids.numel():
        token_of = torch.repeat_interleave(
            torch.arange(tokens, device=hidden.device), exclude_offsets[1:] - exclude_offsets[:-1]
        )
        if bool(((exclude_ids < 0) | (exclude_ids >= own[token_of])).any()):
            raise ValueError("exclude_ids must be local VRT indices of the token's own sample")
        if bool((exclude_ids + vocab == labels[token_of]).any()):
            raise ValueError("exclude_ids must not contain the token's own label")


def vrt_linear_cross_entropy(
    hidden: Tensor,
    text_weight: Tensor,
    prototypes: Tensor,
    sample_index: Tensor,
    proto_offsets: Tensor,
    labels: Tensor,
    *,
    exclude_offsets: Tensor | None = None,
    exclude_ids: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int = 4096,
) -> Tensor:
    """Cross-entropy of ``hidden @ [W_text ; own prototypes].T`` against ``labels``.

    Args:
        hidden (Tensor[T, D]): flattened hidden states (the position *before* each label).
        text_weight (Tensor[V, D]): LM head rows of the text vocabulary (V = ``vrt_base``).
        prototypes (Tensor[ΣP, D]): patch prototypes of the batch, sample-major.
        sample_index (Tensor[T], int64): sample of each token.
        proto_offsets (Tensor[B + 1], int64): sample b owns prototype rows
            ``proto_offsets[b] : proto_offsets[b + 1]`` (``ImageBinding.sample_offsets``).
        labels (Tensor[T], int64): text id, ``V + k`` for the sample's VRT k, or ``ignore_index``.
        exclude_offsets (Tensor[T + 1]), exclude_ids (Tensor[E]): CSR lists of local VRT
            indices removed from each token's softmax (robust CE; see
            :func:`trp.vrt.robust_exclusions`). Default: none.
        reduction: ``"none"`` (Tensor[T], 0 at ignored tokens), ``"sum"``, or ``"mean"`` over
            the non-ignored tokens (0 when there are none, rather than NaN).
        chunk_size: vocabulary rows per chunk (memory ∝ ``chunk_size`` · token block).
    """
    check_tensor(hidden, "hidden")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if (exclude_offsets is None) != (exclude_ids is None):
        raise ValueError("exclude_offsets and exclude_ids go together")
    if exclude_offsets is None:
        tokens = hidden.shape[0] if hidden.dim() == 2 else 0
        exclude_offsets = torch.zeros(tokens + 1, dtype=torch.int64, device=hidden.device)
        exclude_ids = torch.zeros(0, dtype=torch.int64, device=hidden.device)
    args = (
        hidden,
        text_weight,
        prototypes,
        sample_index,
        proto_offsets,
        labels,
        exclude_offsets,
        exclude_ids,
        ignore_index,
        chunk_size,
    )
    _check_metadata(*args)
    # float32 under autocast (a loss); otherwise hidden's dtype, reduced from float32.
    out_dtype = torch.float32 if autocast_active(hidden) else hidden.dtype
    fused = should_use_fused(hidden)
    if check_values_here(hidden, fused):
        _check_data(*args)
    if fused:
        loss = torch.ops.trp.vrt_linear_cross_entropy(*args)[0]  # float32 for half inputs
    else:
        with reference_autocast(hidden.device) as active:
            floats = fp32_inputs(*args[:3]) if active else args[:3]
            loss = reference.vrt_linear_cross_entropy(*floats, *args[3:-1])
    if reduction == "none":
        return loss.to(out_dtype)
    if reduction == "sum":
        return loss.sum().to(out_dtype)
    count = (labels != ignore_index).sum().clamp(min=1)
    return (loss.sum() / count.to(loss.dtype)).to(out_dtype)


class VRTLinearCrossEntropy(nn.Module):
    """Module form of :func:`vrt_linear_cross_entropy` holding ``ignore_index``, reduction and
    chunk size."""

    def __init__(
        self, *, ignore_index: int = -100, reduction: Reduction = "mean", chunk_size: int = 4096
    ) -> None:
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: Tensor,
        text_weight: Tensor,
        prototypes: Tensor,
        sample_index: Tensor,
        proto_offsets: Tensor,
        labels: Tensor,
        exclude_offsets: Tensor | None = None,
        exclude_ids: Tensor | None = None,
    ) -> Tensor:
        return vrt_linear_cross_entropy(
            hidden,
            text_weight,
            prototypes,
            sample_index,
            proto_offsets,
            labels,
            exclude_offsets=exclude_offsets,
            exclude_ids=exclude_ids,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"chunk_size={self.chunk_size}"
        )


def _register() -> None:
    @torch.library.register_fake("trp::vrt_linear_cross_entropy")
    def _(
        hidden,
        text_weight,
        prototypes,
        sample_index,
        proto_offsets,
        labels,
        ex_off,
        ex_ids,
        ignore_index,
        chunk_size,
    ):
        _check_metadata(
            hidden,
            text_weight,
            prototypes,
            sample_index,
            proto_offsets,
            labels,
            ex_off,
            ex_ids,
            ignore_index,
            chunk_size,
        )
        tokens = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return hidden.new_empty((tokens,), dtype=acc), hidden.new_empty((tokens,), dtype=acc)

    @torch.library.register_fake("trp::vrt_linear_cross_entropy_backward")
    def _(
        grad,
        hidden,
        text_weight,
        prototypes,
        sample_index,
        proto_offsets,
        labels,
        ex_off,
        ex_ids,
        lse,
        ignore_index,
        chunk_size,
    ):
        return (
            torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(text_weight, memory_format=torch.contiguous_format),
            torch.empty_like(prototypes, memory_format=torch.contiguous_format),
        )

    def setup_context(ctx, inputs, output) -> None:
        (
            hidden,
            weight,
            protos,
            sample_index,
            proto_offsets,
            labels,
            ex_off,
            ex_ids,
            ignore_index,
            chunk_size,
        ) = inputs
        ctx.save_for_backward(
            hidden, weight, protos, sample_index, proto_offsets, labels, ex_off, ex_ids, output[1]
        )
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(output[1])  # lse is saved state, not a loss

    def backward(ctx, grad_loss: Tensor, grad_lse: Tensor):
        hidden, weight, protos, sample_index, proto_offsets, labels, ex_off, ex_ids, lse = (
            ctx.saved_tensors
        )
        if grad_loss is None:
            grad_loss = torch.zeros(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)
        grads = torch.ops.trp.vrt_linear_cross_entropy_backward(
            grad_loss.contiguous(),
            hidden,
            weight,
            protos,
            sample_index,
            proto_offsets,
            labels,
            ex_off,
            ex_ids,
            lse,
            ctx.ignore_index,
            ctx.chunk_size,
        )
        return (*grads, None, None, None, None, None, None, None)

    torch.library.register_autograd(
        "trp::vrt_linear_cross_entropy", backward, setup_context=setup_context
    )


if native_available():
    _register()
