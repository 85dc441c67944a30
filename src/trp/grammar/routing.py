"""Routing parsed targets to the decoder head of their unit (per triplet, not per sample)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from trp.grammar.types import ParseResult
from trp.grammar.units import resolve_units

__all__ = ["UnitQueries", "route_targets"]


@dataclass(frozen=True)
class UnitQueries:
    """The queries one head receives: one row per target (object) of its unit.

    ``sample``/``triplet``/``instance``: ``Tensor[Q]`` long — batch index, triplet index within
    the sample (counted over all its answers) and target index within the triplet;
    ``positions``: ``Tensor[Q, K]`` long token positions of each target's tokens, padded with -1
    (``K`` = longest VRT run; 1 for ``<REF>`` targets); ``lengths``: ``Tensor[Q]`` tokens per
    target; ``is_vrt``: ``Tensor[Q]`` bool; ``concepts``: the phrase of each query.
    """

    unit: str
    sample: torch.Tensor
    triplet: torch.Tensor
    instance: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    is_vrt: torch.Tensor
    concepts: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.sample.numel())

    def gather(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the target tokens.

        Args:
            hidden: ``Tensor[B, L, C]`` (e.g. the last layer).

        Returns:
            ``Tensor[Q, K, C]`` features (zeros at padding) and ``Tensor[Q, K]`` bool validity.
            For VRTs fed by the state that *emitted* them (PaDT), shift positions by -1 first.
        """
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, L, C], got shape {tuple(hidden.shape)}")
        if len(self) and (
            int(self.sample.max()) >= hidden.shape[0]
            or int(self.positions.max()) >= hidden.shape[1]
        ):
            raise ValueError("queries point outside hidden (wrong batch or sequence length)")
        valid = self.positions >= 0  # Q x K
        pos = self.positions.clamp(min=0).to(hidden.device)
        feats = hidden[self.sample.to(hidden.device)[:, None], pos]  # Q x K x C
        return feats * valid.to(hidden.device)[..., None].to(hidden.dtype), valid


def route_targets(
    results: Sequence[ParseResult | Sequence[ParseResult]],
    *,
    units: Iterable[str] | None = None,
) -> dict[str, UnitQueries]:
    """Group the targets of a batch of parsed answers by unit.

    Args:
        results: one entry per sample: a :class:`ParseResult` from token ids (it must carry
            ``positions``), or a sequence of them (the answer turns of a conversation).
        units: the heads to route to (default: the registry); every one gets an entry, possibly
            empty. A target whose unit is not among them raises ``ValueError``.
    """
    names = resolve_units(units)
    cols: dict[
        str, tuple[list[int], list[int], list[int], list[tuple[int, ...]], list[bool], list[str]]
    ] = {u: ([], [], [], [], [], []) for u in names}
    for b, sample in enumerate(results):
        answers = (sample,) if isinstance(sample, ParseResult) else tuple(sample)
        t_index = 0
        for res in answers:
            if not isinstance(res, ParseResult):
                raise TypeError(f"sample {b}: expected ParseResult, got {type(res).__name__}")
            if res.positions is None:
                raise ValueError(f"sample {b}: parse token ids (parse_ids) to get positions")
            for triplet, positions in zip(res.triplets, res.positions):
                if triplet.unit not in cols:
                    raise ValueError(f"sample {b}: unit {triplet.unit!r} has no head ({names})")
                s, t, i, p, v, c = cols[triplet.unit]
                for j, (target, pos) in enumerate(zip(triplet.targets, positions)):
                    s.append(b)
                    t.append(t_index)
                    i.append(j)
                    p.append(pos)
                    v.append(target.kind == "vrt")
                    c.append(triplet.concept)
                t_index += 1
    out = {}
    for unit, (s, t, i, p, v, c) in cols.items():
        k = max((len(x) for x in p), default=1)
        positions = torch.full((len(p), k), -1, dtype=torch.long)
        for q, pos in enumerate(p):
            positions[q, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        out[unit] = UnitQueries(
            unit=unit,
            sample=torch.tensor(s, dtype=torch.long),
            triplet=torch.tensor(t, dtype=torch.long),
            instance=torch.tensor(i, dtype=torch.long),
            positions=positions,
            lengths=torch.tensor([len(x) for x in p], dtype=torch.long),
            is_vrt=torch.tensor(v, dtype=torch.bool),
            concepts=tuple(c),
        )
    return out
