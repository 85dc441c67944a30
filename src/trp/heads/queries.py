"""Queries of a head: LM hidden states -> d_model object queries, grouped per image.

A query points at its image by index (like RoIAlign's batch index); image features are never
copied per query. Inside a decoder the queries of each image are packed into a padded
``[B, M, D]`` batch with a validity mask (:class:`QueryBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["QueryBatch", "QueryEncoder", "check_query_inputs"]

Pooling = Literal["attention", "mean"]


def check_query_inputs(
    queries: object, query_image_index: object, num_images: int, in_dim: int
) -> None:
    """Raise a clear error for malformed queries / image indices."""
    if not isinstance(queries, Tensor) or not queries.is_floating_point():
        raise TypeError("queries must be a floating-point tensor [Nq, C]")
    if queries.dim() != 2 or queries.shape[1] != in_dim:
        raise ValueError(f"queries must have shape [Nq, {in_dim}], got {list(queries.shape)}")
    if not isinstance(query_image_index, Tensor) or query_image_index.dtype != torch.int64:
        raise TypeError("query_image_index must be an int64 tensor [Nq]")
    if query_image_index.shape != (queries.shape[0],):
        raise ValueError(
            f"query_image_index must have shape [{queries.shape[0]}], got "
            f"{list(query_image_index.shape)}"
        )
    if query_image_index.numel():
        lo, hi = int(query_image_index.min()), int(query_image_index.max())
        if lo < 0 or hi >= num_images:
            raise IndexError(
                f"query_image_index must lie in [0, {num_images}) (the feature batch), got values "
                f"in [{lo}, {hi}]"
            )


@dataclass(frozen=True)
class QueryBatch:
    """Object queries and their per-image packing.

    Attributes:
        embed (Tensor[N, D]): one query per object.
        pos (Tensor[N, D]): learned query position embedding (rank of the object in its image).
        image_index (Tensor[N], int64): image of each object.
        slot (Tensor[N], int64): column of each object in the padded batch.
        num_images (int): B; max_per_image (int): M (>= 1 so padded tensors are never empty).
    """

    embed: Tensor
    pos: Tensor
    image_index: Tensor
    slot: Tensor
    num_images: int
    max_per_image: int

    def __len__(self) -> int:
        return int(self.embed.shape[0])

    def pad(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """``[N, ...]`` -> ``[B, M, ...]`` (``fill`` where an image has fewer objects)."""
        out = x.new_full((self.num_images, self.max_per_image, *x.shape[1:]), fill)
        return out.index_put((self.image_index, self.slot), x)

    def unpad(self, y: Tensor) -> Tensor:
        """``[B, M, ...]`` -> ``[N, ...]``."""
        return y[self.image_index, self.slot]

    def valid(self) -> Tensor:
        """``Tensor[B, M]`` bool, True at real objects."""
        mask = torch.zeros(
            self.num_images, self.max_per_image, dtype=torch.bool, device=self.embed.device
        )
        return mask.index_put(
            (self.image_index, self.slot), torch.ones_like(self.slot, dtype=torch.bool)
        )

    def attention_padding_mask(self) -> Tensor:
        """Key-padding mask ``[B, M]`` (True = ignore) that never masks a whole row.

        Slot 0 stays visible even for images without objects, so padded rows of an empty image
        attend to a zero dummy instead of producing NaN; real rows never see another image.
        """
        mask = ~self.valid()
        mask[:, 0] = False
        return mask


class QueryEncoder(nn.Module):
    """LM width -> ``d_model`` projection, optional pooling of several queries per object, and
    learned query position embeddings.

    Args:
        in_dim: LM hidden width ``C_lm``.
        d_model: decoder width.
        pooling: how the hidden states of one object (a VRT run) become one query:
            ``"attention"`` (learned softmax weights per token) or ``"mean"``.
        max_queries: number of learned position embeddings; an image's k-th object uses
            embedding ``min(k, max_queries - 1)``.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        d_model: int = 256,
        pooling: Pooling = "attention",
        max_queries: int = 100,
    ) -> None:
        super().__init__()
        if pooling not in ("attention", "mean"):
            raise ValueError(f"pooling must be 'attention' or 'mean', got {pooling!r}")
        if in_dim <= 0 or d_model <= 0 or max_queries <= 0:
            raise ValueError("in_dim, d_model and max_queries must be positive")
        self.in_dim = in_dim
        self.d_model = d_model
        self.pooling: Pooling = pooling
        self.proj = nn.Sequential(
            nn.Linear(in_dim, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model),
            nn.LayerNorm(d_model),
        )
        self.pool_score = nn.Linear(d_model, 1) if pooling == "attention" else None
        self.query_pos = nn.Embedding(max_queries, d_model)

    def _pool(self, x: Tensor, image_index: Tensor, object_index: Tensor) -> tuple[Tensor, Tensor]:
        if object_index.dtype != torch.int64 or object_index.shape != image_index.shape:
            raise ValueError(f"object_index must be int64 of shape {list(image_index.shape)}")
        n = int(object_index.max()) + 1 if object_index.numel() else 0
        if object_index.numel() and int(object_index.min()) < 0:
            raise IndexError("object_index must be >= 0")
        counts = torch.bincount(object_index, minlength=n)
        if bool((counts == 0).any()):
            raise ValueError("object_index must use every object id in [0, max] (no gaps)")
        img_lo = torch.full((n,), image_index.numel(), dtype=torch.int64, device=x.device)
        # include_self=False: the fill (the query count) is no bound on the image indices.
        img_lo = img_lo.scatter_reduce(0, object_index, image_index, "amin", include_self=False)
        img_hi = torch.zeros(n, dtype=torch.int64, device=x.device)
        img_hi = img_hi.scatter_reduce(0, object_index, image_index, "amax", include_self=False)
        if bool((img_lo != img_hi).any()):
            raise ValueError("all queries of one object must point at the same image")
        if self.pool_score is None:
            weight = (1.0 / counts.to(x.dtype))[object_index]
        else:
            score = self.pool_score(x).squeeze(-1)  # Nq
            top = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
            top = top.scatter_reduce(0, object_index, score.detach(), "amax")
            e = (score - top[object_index]).exp()
            total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, object_index, e)
            weight = e / total[object_index]
        pooled = x.new_zeros(n, x.shape[1]).index_add(0, object_index, x * weight[:, None])
        return pooled, img_lo

    def forward(
        self,
        queries: Tensor,
        query_image_index: Tensor,
        *,
        num_images: int,
        object_index: Tensor | None = None,
    ) -> QueryBatch:
        """Encode.

        Args:
            queries (Tensor[Nq, C_lm]): hidden states (``<REF>`` states or VRT-run states).
            query_image_index (Tensor[Nq], int64): image of each query, in ``[0, num_images)``.
            num_images: B, the feature batch size.
            object_index (Tensor[Nq], int64, optional): object of each query (ids ``0..N-1``, all
                used); the queries of one object are pooled into one. None: one object per query.
        Returns:
            :class:`QueryBatch` with N objects, in object-id (or query) order.
        """
        check_query_inputs(queries, query_image_index, num_images, self.in_dim)
        query_image_index = query_image_index.to(queries.device)
        x = self.proj(queries)  # Nq x D
        image_index = query_image_index
        if object_index is not None:
            if not isinstance(object_index, Tensor):
                raise TypeError("object_index must be an int64 tensor [Nq]")
            x, image_index = self._pool(x, query_image_index, object_index.to(queries.device))
        n = x.shape[0]
        # Rank of each object among its image's objects, in order of appearance.
        order = torch.sort(image_index, stable=True).indices
        counts = torch.bincount(image_index, minlength=num_images)
        starts = counts.cumsum(0) - counts
        slot = torch.empty_like(image_index)
        slot[order] = torch.arange(n, device=x.device) - starts[image_index[order]]
        max_per_image = max(int(counts.max()) if n else 0, 1)
        pos = self.query_pos(slot.clamp(max=self.query_pos.num_embeddings - 1))
        return QueryBatch(
            embed=x,
            pos=pos,
            image_index=image_index,
            slot=slot,
            num_images=num_images,
            max_per_image=max_per_image,
        )
