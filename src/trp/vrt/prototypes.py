"""Patch prototypes: the per-image token embeddings of visual reference tokens (PaDT)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VRTPrototypes"]


class VRTPrototypes(nn.Module):
    """``P = LN(E) + Up(Down(LN(E)))`` for merged patch features ``E`` at the LM width.

    The LayerNorm's weight and bias start at zero and the low-rank projection has no bias, so
    ``P = 0`` at initialisation: VRTs start as null embeddings / zero classifier rows and the
    text model is undisturbed when training begins.

    Args:
        dim: LM hidden size D.
        rank: width of the low-rank bottleneck (PaDT: 64).
        eps: LayerNorm epsilon.
        zero_init: start at ``P = 0`` (PaDT, for a pretrained LM); ``False`` starts the
            LayerNorm at weight 1 / bias 0, for an LM trained from scratch, which has nothing
            to protect and would otherwise wait for the LayerNorm weight to grow before the
            low-rank path receives gradients.
    """

    def __init__(
        self, *, dim: int, rank: int = 64, eps: float = 1e-6, zero_init: bool = True
    ) -> None:
        super().__init__()
        if dim < 1 or rank < 1:
            raise ValueError(f"dim and rank must be positive, got dim={dim}, rank={rank}")
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        if zero_init:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, features: Tensor) -> Tensor:
        """``features (Tensor[ΣP, D]) -> prototypes (Tensor[ΣP, D])``."""
        if features.dim() != 2 or features.shape[1] != self.norm.normalized_shape[0]:
            raise ValueError(
                f"features must have shape [N, {self.norm.normalized_shape[0]}], "
                f"got {list(features.shape)}"
            )
        x = self.norm(features)
        return x + self.up(self.down(x))
