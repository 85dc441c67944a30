"""Output side of visual reference tokens: logits over text ⊕ the sample's own patches."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trp.vrt.binding import ImageBinding

__all__ = ["VRTHead"]


class VRTHead(nn.Module):
    """LM head whose vocabulary is extended, per sample, with that sample's patch prototypes.

    ``logits[r, :, :vrt_base] = h @ W_text[:vrt_base].T (+ bias)`` and
    ``logits[r, :, vrt_base + k] = h @ P[sample_offsets[s] + k]`` for the sample's own patches,
    ``-inf`` on padded slots (k ≥ the sample's patch count). Two products, never
    ``h @ cat(W, P).T``. Works for tied (``text_head`` is the input ``nn.Embedding``) and
    untied (an ``nn.Linear``) LM heads; the prototypes are the VRT classifier rows either way.

    Args:
        text_head: module with ``weight [V_out, D]`` (and optional ``bias [V_out]``).
        vrt_base: id of ``<|VRT_0|>`` (default: ``V_out``).
    """

    def __init__(self, *, text_head: nn.Module, vrt_base: int | None = None) -> None:
        super().__init__()
        weight = getattr(text_head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError("text_head must have a 2-D .weight (nn.Linear or nn.Embedding)")
        rows = int(weight.shape[0])
        base = rows if vrt_base is None else vrt_base
        if isinstance(base, bool) or not isinstance(base, int) or not 0 < base <= rows:
            raise ValueError(f"vrt_base must be an int in [1, {rows}], got {vrt_base!r}")
        self.text_head = text_head
        self.vrt_base = base

    @property
    def weight(self) -> Tensor:
        return self.text_head.weight

    def text_logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., D] -> [..., vrt_base]``."""
        bias = getattr(self.text_head, "bias", None)
        weight = self.weight[: self.vrt_base]
        return F.linear(hidden, weight, None if bias is None else bias[: self.vrt_base])

    def forward(
        self,
        hidden: Tensor,
        *,
        prototypes: Tensor | None = None,
        binding: ImageBinding | None = None,
    ) -> Tensor:
        """``hidden (Tensor[R, L, D])`` → ``Tensor[R, L, vrt_base + max_patches]``.

        Row r belongs to sample ``r // (R // B)``. Without a binding the logits are text only.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"hidden must have shape [R, L, {self.weight.shape[1]}], got {list(hidden.shape)}"
            )
        if binding is None:
            return self.text_logits(hidden)  # R x L x V
        if prototypes is None:
            raise ValueError("a binding needs its prototypes")
        if binding.vrt_base != self.vrt_base:
            raise ValueError(
                f"binding.vrt_base={binding.vrt_base} differs from the head's {self.vrt_base}"
            )
        if prototypes.dim() != 2 or prototypes.shape != (binding.total_patches, hidden.shape[-1]):
            raise ValueError(
                f"prototypes must have shape [{binding.total_patches}, {hidden.shape[-1]}], "
                f"got {list(prototypes.shape)}"
            )
        # Each sample's rows are a contiguous block of generation rows and its prototypes a
        # contiguous block of feature rows: one product per sample over views, no gather.
        per = binding.rows_per_sample(hidden.shape[0])
        offsets = binding.sample_offsets.tolist()
        protos = prototypes.to(hidden.dtype)
        if self._records_graph(hidden, protos):
            return self._concatenated(hidden, protos, per, offsets, binding.max_patches)
        return self._into_one_output(hidden, protos, per, offsets, binding.max_patches)

    def _records_graph(self, hidden: Tensor, protos: Tensor) -> bool:
        """Whether the logits need autograd or autocast (``out=`` products support neither)."""
        bias = getattr(self.text_head, "bias", None)
        tensors = [hidden, self.weight, protos] + ([] if bias is None else [bias])
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return True
        return torch.is_autocast_enabled(hidden.device.type) or any(
            t.dtype != hidden.dtype for t in tensors
        )

    def _concatenated(
        self, hidden: Tensor, protos: Tensor, per: int, offsets: list[int], width: int
    ) -> Tensor:
        text = self.text_logits(hidden)  # R x L x V
        pieces = []
        for s in range(len(offsets) - 1):
            own = protos[offsets[s] : offsets[s + 1]]  # P_s x D
            scores = torch.matmul(hidden[s * per : (s + 1) * per], own.T)  # per x L x P_s
            pieces.append(F.pad(scores, (0, width - own.shape[0]), value=float("-inf")))
        vrt = torch.cat(pieces, dim=0)  # R x L x Pmax
        return torch.cat([text, vrt.to(text.dtype)], dim=-1)

    def _into_one_output(
        self, hidden: Tensor, protos: Tensor, per: int, offsets: list[int], width: int
    ) -> Tensor:
        # Decoding: every product writes into its own columns of the one [R, L, V + Pmax] result
        # (the GEMM's leading dimension is the row length), so the [R, L, V] text logits are
        # never copied.
        rows, length, dim = hidden.shape
        vocab = self.vrt_base
        out = hidden.new_empty(rows, length, vocab + width)
        flat = hidden.reshape(rows * length, dim)
        table = out.view(rows * length, vocab + width)
        weight = self.weight[:vocab]
        bias = getattr(self.text_head, "bias", None)
        if bias is None:
            torch.mm(flat, weight.T, out=table[:, :vocab])
        else:
            torch.addmm(bias[:vocab], flat, weight.T, out=table[:, :vocab])
        block = per * length
        for s in range(len(offsets) - 1):
            own = protos[offsets[s] : offsets[s + 1]]  # P_s x D
            lo, hi = s * block, (s + 1) * block
            torch.mm(flat[lo:hi], own.T, out=table[lo:hi, vocab : vocab + own.shape[0]])
            table[lo:hi, vocab + own.shape[0] :] = float("-inf")
        return out
