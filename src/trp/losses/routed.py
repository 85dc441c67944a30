"""``RoutedCriterion``: each routed unit's criterion, mirroring :class:`trp.heads.DecoderRouter`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from trp.heads.router import RoutedPredictions

__all__ = ["RoutedCriterion"]


class RoutedCriterion(nn.Module):
    """Apply each unit's criterion to that unit's routed predictions.

    Every criterion has the one interface ``criterion(predictions, targets, *, pred_group)``;
    the router's :class:`RoutedPredictions` carry the predictions and their ``group`` (the
    triplet of each object), the targets carry ``group`` too (``trp.heads.triplet_group``), so
    matching stays inside triplets.

    Args:
        criteria: unit -> criterion (``BoxCriterion``, ``MaskCriterion``, ``KeypointCriterion``,
            ``DepthCriterion``, or anything with that call).

    Example::

        router = DecoderRouter({"box": box_head, "mask": mask_head}, route="all")
        criterion = RoutedCriterion({"box": BoxCriterion(), "mask": MaskCriterion()})
        routed = router(parses, hidden, features, input_ids=ids, image_size=(H, W))
        losses = criterion(routed, {"box": {"boxes": boxes, "group": group},
                                    "mask": {"masks": masks, "group": group}})
        total = sum(losses.values())      # keys "box/loss_bbox", "mask/loss_dice", ...
    """

    def __init__(self, criteria: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not criteria:
            raise ValueError("criteria must not be empty")
        self.criteria = nn.ModuleDict(dict(criteria))

    def forward(
        self,
        routed: Mapping[str, RoutedPredictions],
        targets: Mapping[str, Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Compute every unit's losses.

        Args:
            routed: the router's output, unit -> :class:`RoutedPredictions`.
            targets: unit -> that criterion's targets (e.g. ``{"boxes": [G, 4], "group": [G]}``);
                a unit may be missing when nothing was routed to it.
        Returns:
            ``"{unit}/{name}"`` -> weighted loss, for every unit with predictions. Units with
            nothing to decode (no predictions, or absent from ``routed``) are skipped.
        Raises:
            KeyError: a unit has predictions but no criterion, or no targets.
        """
        losses: dict[str, Tensor] = {}
        for unit, rp in routed.items():
            if not isinstance(rp, RoutedPredictions):
                raise TypeError(f"routed[{unit!r}] must be a RoutedPredictions")
            if len(rp) == 0:
                continue
            if unit not in self.criteria:
                raise KeyError(f"unit {unit!r} has predictions but no criterion")
            if unit not in targets:
                raise KeyError(f"unit {unit!r} has {len(rp)} predictions but no targets")
            unit_targets = dict(targets[unit])
            group = unit_targets.get("group")
            pred_group = rp.group if group is not None else None
            if group is not None and isinstance(group, Tensor):
                unit_targets["group"] = group.to(torch.int64)
            part = self.criteria[unit](rp.predictions, unit_targets, pred_group=pred_group)
            losses.update({f"{unit}/{name}": value for name, value in part.items()})
        return losses
