"""Input side of visual reference tokens: VRT ids embed as their image's patch prototypes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trp.vrt.binding import ImageBinding

__all__ = ["VRTEmbedding"]


class VRTEmbedding(nn.Module):
    """Token embedding over the text vocabulary ⊕ each sample's own patches.

    Text ids (``< vrt_base``) gather rows of the LM's table; VRT ids gather rows of the bound
    prototypes (``binding.to_global``). No ``[V + ΣP, D]`` table is ever built.

    Args:
        text_embedding: the LM's input embedding (``weight [V_emb, D]``).
        vrt_base: id of ``<|VRT_0|>`` (default: ``V_emb``). Rows ``>= vrt_base`` of a padded
            table are unreachable: those ids are VRTs.
    """

    def __init__(self, *, text_embedding: nn.Embedding, vrt_base: int | None = None) -> None:
        super().__init__()
        weight = getattr(text_embedding, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError("text_embedding must have a 2-D .weight (an nn.Embedding)")
        rows = int(weight.shape[0])
        base = rows if vrt_base is None else vrt_base
        if isinstance(base, bool) or not isinstance(base, int) or not 0 < base <= rows:
            raise ValueError(f"vrt_base must be an int in [1, {rows}], got {vrt_base!r}")
        self.text_embedding = text_embedding
        self.vrt_base = base

    @property
    def weight(self) -> Tensor:
        return self.text_embedding.weight

    def forward(
        self,
        input_ids: Tensor,
        *,
        prototypes: Tensor | None = None,
        binding: ImageBinding | None = None,
    ) -> Tensor:
        """Embed ``input_ids (Tensor[R, L])`` → ``Tensor[R, L, D]``.

        Row r belongs to sample ``r // (R // B)`` (beams are consecutive). ``prototypes
        (Tensor[ΣP, D])`` and ``binding`` are needed only when VRT ids occur.
        """
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int32/int64, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [R, L], got {list(input_ids.shape)}")
        if input_ids.numel() and int(input_ids.min()) < 0:
            raise ValueError("input_ids must be >= 0")
        is_vrt = input_ids >= self.vrt_base  # R x L
        if not bool(is_vrt.any()):
            return self.text_embedding(input_ids)
        if prototypes is None or binding is None:
            raise ValueError("input_ids hold VRT ids but no binding/prototypes are set")
        if binding.vrt_base != self.vrt_base:
            raise ValueError(
                f"binding.vrt_base={binding.vrt_base} differs from the embedding's {self.vrt_base}"
            )
        if prototypes.dim() != 2 or prototypes.shape != (
            binding.total_patches,
            self.weight.shape[1],
        ):
            raise ValueError(
                f"prototypes must have shape [{binding.total_patches}, {self.weight.shape[1]}], "
                f"got {list(prototypes.shape)}"
            )
        text = self.text_embedding(input_ids.masked_fill(is_vrt, 0))  # R x L x D
        row, col = is_vrt.nonzero(as_tuple=True)
        samples = binding.sample_of_rows(input_ids.shape[0], device=input_ids.device)[row]
        feature_rows = binding.to_global(input_ids[row, col], samples)
        vrt = prototypes[feature_rows.to(prototypes.device)].to(text.dtype)  # K x D
        return text.index_put((row, col), vrt)
