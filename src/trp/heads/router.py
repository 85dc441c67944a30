"""``DecoderRouter``: parsed answers + LM hidden states -> each unit's head, per triplet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trp.grammar import ParseResult, UnitQueries, route_targets

__all__ = ["DecoderRouter", "RoutedPredictions", "triplet_group"]

_GROUP_STRIDE = 1 << 20


def triplet_group(sample: Tensor, triplet: Tensor) -> Tensor:
    """Group id of a (sample, triplet) pair: the key the criteria match targets within."""
    if triplet.numel() and int(triplet.max()) >= _GROUP_STRIDE:
        raise ValueError(f"triplet indices must be < {_GROUP_STRIDE}")
    return sample.to(torch.int64) * _GROUP_STRIDE + triplet.to(torch.int64)


@dataclass(frozen=True)
class RoutedPredictions:
    """One unit's head output with the indices that map each object back to the answer.

    ``sample``/``triplet``/``instance`` (Tensor[N], int64): batch index, triplet index within the
    sample, target index within the triplet; ``group`` = :func:`triplet_group` of the first two
    (pass it as ``pred_group`` to the criteria); ``concepts``: the phrase of each object.
    """

    unit: str
    predictions: dict
    sample: Tensor
    triplet: Tensor
    instance: Tensor
    group: Tensor
    concepts: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.sample.numel())


class DecoderRouter(nn.Module):
    """Call each unit's head with exactly the queries of that unit's targets.

    Routing is per parsed triplet (its ``<Unit>``), not per sample: one answer may hold box,
    mask and keypoint triplets. A ``<REF>`` target's query is the hidden state at the ``<REF>``
    token; a VRT run's queries are the states at its tokens shifted back by ``shift`` (PaDT:
    ``shift=1``, the step that *emitted* each VRT), pooled per object by the head.

    Args:
        heads: unit name -> head (``head(queries, features, query_image_index, *,
            object_index, image_size)``).
        shift: positions to step back for VRT targets (0 or 1).
    """

    def __init__(self, heads: Mapping[str, nn.Module], *, shift: int = 1) -> None:
        super().__init__()
        if not heads:
            raise ValueError("heads must not be empty")
        if shift not in (0, 1):
            raise ValueError(f"shift must be 0 or 1, got {shift}")
        self.heads = nn.ModuleDict(dict(heads))
        self.shift = shift

    def _queries(
        self, uq: UnitQueries, hidden: Tensor, image_index: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        pos = uq.positions.clone()  # Q x K
        pos[uq.is_vrt] = torch.where(pos[uq.is_vrt] >= 0, pos[uq.is_vrt] - self.shift, -1)
        if bool((pos[uq.is_vrt][:, 0] < 0).any()) if len(uq) else False:
            raise ValueError("a VRT run starts at position 0: nothing emitted it (use shift=0)")
        if pos.numel() and int(pos.max()) >= hidden.shape[1]:
            raise ValueError(
                f"target positions reach {int(pos.max())} but hidden has "
                f"{hidden.shape[1]} positions"
            )
        obj, col = torch.nonzero(pos >= 0, as_tuple=True)  # Nt, Nt
        sample = uq.sample[obj].to(hidden.device)
        queries = hidden[sample, pos[obj, col].to(hidden.device)]  # Nt x C
        object_index = obj.to(hidden.device) if bool((uq.lengths > 1).any()) else None
        return queries, image_index[sample], object_index

    def forward(
        self,
        results: Sequence[ParseResult | Sequence[ParseResult]],
        hidden: Tensor,
        features: Sequence[Tensor],
        *,
        image_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, RoutedPredictions]:
        """Route and decode.

        Args:
            results: per sample, the :class:`ParseResult` of its answer parsed from token ids
                (``trp.grammar.parse_ids``; positions index ``hidden``), or a list of them.
            hidden (Tensor[B, T, C]): LM hidden states (last layer).
            features: L maps ``[B_img, C_l, H_l, W_l]``.
            image_index (Tensor[B], int64): image of each sample (default: sample b -> image b).
            image_size: (H, W) of the images (dense heads).
        Returns:
            unit -> :class:`RoutedPredictions` for every head (possibly empty).
        """
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            raise ValueError("hidden must be a Tensor[B, T, C]")
        if len(results) != hidden.shape[0]:
            raise ValueError(f"got {len(results)} parse results for {hidden.shape[0]} samples")
        if image_index is None:
            image_index = torch.arange(hidden.shape[0], device=hidden.device)
        if image_index.dtype != torch.int64 or image_index.shape != (hidden.shape[0],):
            raise ValueError(f"image_index must be int64 of shape [{hidden.shape[0]}]")
        image_index = image_index.to(hidden.device)
        routed = route_targets(results, units=list(self.heads))
        out = {}
        for unit, head in self.heads.items():
            uq = routed[unit]
            queries, q_image, object_index = self._queries(uq, hidden, image_index)
            preds = head(
                queries, features, q_image, object_index=object_index, image_size=image_size
            )
            out[unit] = RoutedPredictions(
                unit=unit,
                predictions=preds,
                sample=uq.sample,
                triplet=uq.triplet,
                instance=uq.instance,
                group=triplet_group(uq.sample, uq.triplet),
                concepts=uq.concepts,
            )
        return out
