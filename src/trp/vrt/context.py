"""Contextual VRT classifier rows: the patch prototypes plus what the LM read at each patch."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VRTContext"]


class VRTContext(nn.Module):
    """``rows = P + W · LN(H_img)``: output-side VRT rows that also see the LM's last states.

    PaDT scores a VRT by ``h · P_k``, where the prototype ``P_k`` comes from the vision encoder
    alone: the query state ``h`` must then carry *where* the referent is, and every relation
    ("the circle left of the star") has to be resolved inside that one vector. When the prompt
    puts the instruction before the image tokens, the LM's last hidden state ``H_img[k]`` at
    patch ``k`` has read the expression and the other patches, so it can tell by itself whether
    its patch belongs to the referent; adding its projection to the classifier row turns object
    choice into a per-patch decision the transformer makes for every patch at once. The input
    side (VRT embeddings) keeps the plain prototypes. ``W`` starts at zero: the rows start as
    PaDT's.

    Args:
        dim: LM hidden size D.
        eps: LayerNorm epsilon.
    """

    def __init__(self, *, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, prototypes: Tensor, states: Tensor) -> Tensor:
        """``prototypes (Tensor[ΣP, D])``, ``states (Tensor[ΣP, D])``: the LM's last hidden
        state at each patch token, in prototype order -> ``rows (Tensor[ΣP, D])``."""
        dim = self.norm.normalized_shape[0]
        if prototypes.dim() != 2 or prototypes.shape[1] != dim:
            raise ValueError(f"prototypes must have shape [N, {dim}], got {list(prototypes.shape)}")
        if states.shape != prototypes.shape:
            raise ValueError(
                f"states must match the prototypes' shape {list(prototypes.shape)}, "
                f"got {list(states.shape)}"
            )
        return prototypes + self.proj(self.norm(states)).to(prototypes.dtype)
