"""``vrt_token_loss``: the next-token loss of answers over text ⊕ each sample's own patches.

One function for the recipes and for users fine-tuning their own VLM: it shifts the labels,
keeps only the answer tokens, applies PaDT's robust exclusion (a VRT label does not penalise the
object's *other* target patches) and calls the fused :func:`trp.ops.vrt_linear_cross_entropy`,
which never materialises the ``[N, V + P]`` logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trp.ops import vrt_linear_cross_entropy
from trp.vrt.binding import ImageBinding
from trp.vrt.targets import robust_exclusions

__all__ = ["vrt_token_loss"]


def vrt_token_loss(
    hidden: Tensor,
    labels: Tensor,
    *,
    text_weight: Tensor,
    vrt_rows: Tensor,
    binding: ImageBinding,
    objects: Sequence[tuple[Sequence[int], Tensor]] | None = None,
) -> Tensor:
    """Mean cross-entropy over the answer tokens.

    Args:
        hidden (Tensor[B, L, D]): the LM's last hidden states over the full conversations
            (position ``t`` predicts token ``t + 1``).
        labels (Tensor[B, L], int64): the conversation ids with ``-100`` outside the answers
            (HF convention, *not* shifted).
        text_weight (Tensor[V_out, D]): the LM head's weight; rows ``>= binding.vrt_base`` are
            ignored (VRT ids score against ``vrt_rows``).
        vrt_rows (Tensor[ΣP, D]): the VRT classifier rows of the bound images.
        binding: the batch's :class:`ImageBinding` (sample ``b`` owns its images' patches).
        objects: per sample ``(label positions, target patches)``: the sequence positions of
            one object's VRT run and every patch that may name it (local ids); those patches
            are excluded from the run's softmax except the labelled one. ``None``: plain CE.
    Returns:
        the scalar mean over answer tokens (fp32 accumulation).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, L, D] and labels [B, L]; got {list(hidden.shape)} and "
            f"{list(labels.shape)}"
        )
    b, length = labels.shape
    if binding.num_samples != b:
        raise ValueError(f"the binding has {binding.num_samples} samples, labels {b}")
    if objects is not None and len(objects) != b:
        raise ValueError(f"objects needs one entry per sample ({b}), got {len(objects)}")
    shifted = hidden[:, :-1]  # B x L-1 x D
    targets = labels[:, 1:]  # B x L-1
    n = length - 1
    flat_labels = targets.reshape(-1)
    active = flat_labels != -100
    if not bool(active.any()):
        raise ValueError("no answer token in the batch (every label is -100)")
    base = binding.vrt_base
    # A label at sequence position p is predicted from position p - 1.
    runs = [
        ([s * n + p - 1 for p in positions], patches)
        for s, (positions, patches) in enumerate(objects or [])
        if positions
    ]
    offsets, ids = robust_exclusions(flat_labels.cpu(), runs, vrt_base=base)
    keep = active.nonzero().flatten()
    counts = offsets[1:] - offsets[:-1]
    kept_counts = counts[keep.cpu()]
    row_of_id = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    kept_ids = ids[active.cpu()[row_of_id]]
    kept_offsets = torch.cat([kept_counts.new_zeros(1), kept_counts.cumsum(0)])
    dev = hidden.device
    sample_index = torch.arange(b, device=dev).repeat_interleave(n)[keep]
    return vrt_linear_cross_entropy(
        shifted.reshape(b * n, -1)[keep],
        # The whole weight when it holds exactly the text rows: a slice's backward allocates a
        # zero [V, D] gradient and copies into it (one extra V x D buffer at 3B sizes).
        text_weight if base == text_weight.shape[0] else text_weight[:base],
        vrt_rows,
        sample_index,
        binding.sample_offsets.to(dev),
        flat_labels[keep],
        exclude_offsets=kept_offsets.to(dev),
        exclude_ids=kept_ids.to(dev),
    )
