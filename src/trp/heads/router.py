"""``DecoderRouter``: parsed answers + LM hidden states -> one :class:`HeadInputs` -> each head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from trp.grammar import ParseResult, UnitQueries, route_targets
from trp.heads.inputs import HeadInputs
from trp.vrt.binding import ImageBinding
from trp.vrt.targets import run_reference_boxes

__all__ = ["DecoderRouter", "Route", "RoutedPredictions", "triplet_group"]

_GROUP_STRIDE = 1 << 20

Route = Literal["unit", "all"]


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
    (pass it as ``pred_group`` to the criteria); ``concepts``: the phrase of each object;
    ``is_vrt`` (Tensor[N], bool): the object is a VRT run (else a ``<REF>``).
    """

    unit: str
    predictions: dict
    sample: Tensor
    triplet: Tensor
    instance: Tensor
    group: Tensor
    concepts: tuple[str, ...]
    is_vrt: Tensor

    def __len__(self) -> int:
        return int(self.sample.numel())


def _concat(parts: Sequence[UnitQueries], unit: str) -> UnitQueries:
    """All targets of ``parts`` as one :class:`UnitQueries`, in answer order (sample, triplet,
    instance)."""
    k = max((int(p.positions.shape[1]) for p in parts), default=1)
    pad = [
        torch.cat([p.positions, p.positions.new_full((len(p), k - p.positions.shape[1]), -1)], 1)
        for p in parts
    ]
    sample = torch.cat([p.sample for p in parts])
    triplet = torch.cat([p.triplet for p in parts])
    instance = torch.cat([p.instance for p in parts])
    key = (sample * _GROUP_STRIDE + triplet) * _GROUP_STRIDE + instance
    order = torch.argsort(key, stable=True)
    concepts = [c for p in parts for c in p.concepts]
    return UnitQueries(
        unit=unit,
        sample=sample[order],
        triplet=triplet[order],
        instance=instance[order],
        positions=torch.cat(pad)[order],
        lengths=torch.cat([p.lengths for p in parts])[order],
        is_vrt=torch.cat([p.is_vrt for p in parts])[order],
        concepts=tuple(concepts[i] for i in order.tolist()),
    )


class DecoderRouter(nn.Module):
    """Call each unit's head with the queries of its targets, as one :class:`HeadInputs`.

    A ``<REF>`` target's query is the hidden state at the ``<REF>`` token; a VRT run's queries
    are the states at its tokens shifted back by ``shift`` (PaDT: ``shift=1``, the step that
    *emitted* each VRT), pooled per object by the head (``HeadInputs.object_index``).

    Args:
        heads: unit name -> head (``head(HeadInputs) -> dict``).
        shift: positions to step back for VRT targets (0 or 1).
        route: ``"unit"`` — per parsed triplet's ``<Unit>`` (one answer may hold box, mask and
            keypoint triplets; a unit without a head raises); ``"all"`` — every target goes to
            every head (PaDT decodes box, mask and score from every VRT run).
        ref_id: id of the ``<REF>`` token; vrt_base: id of ``<|VRT_0|>``. With ``input_ids``
            given to :meth:`forward`, a target position that does not hold its token (``ref_id``
            for ``<REF>``, an id >= ``vrt_base`` for a VRT) raises instead of reading the wrong
            state. ``vrt_base`` defaults to the ``binding``'s.
    """

    def __init__(
        self,
        heads: Mapping[str, nn.Module],
        *,
        shift: int = 1,
        route: Route = "unit",
        ref_id: int | None = None,
        vrt_base: int | None = None,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("heads must not be empty")
        if shift not in (0, 1):
            raise ValueError(f"shift must be 0 or 1, got {shift}")
        if route not in ("unit", "all"):
            raise ValueError(f"route must be 'unit' or 'all', got {route!r}")
        for name, value in (("ref_id", ref_id), ("vrt_base", vrt_base)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
        self.heads = nn.ModuleDict(dict(heads))
        self.shift = shift
        self.route: Route = route
        self.ref_id = ref_id
        self.vrt_base = vrt_base

    def extra_repr(self) -> str:
        return f"shift={self.shift}, route={self.route!r}"

    def _check_tokens(self, uq: UnitQueries, input_ids: Tensor, vrt_base: int | None) -> None:
        if not len(uq):
            return
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
        pos = uq.positions
        if int(pos.max()) >= input_ids.shape[1]:
            raise ValueError(
                f"target positions reach {int(pos.max())} but input_ids has "
                f"{input_ids.shape[1]} columns"
            )
        ids = input_ids.cpu()[uq.sample[:, None], pos.clamp(min=0)]  # Q x K
        real = pos >= 0
        bad = torch.zeros_like(real)
        if self.ref_id is not None:
            bad |= real & ~uq.is_vrt[:, None] & (ids != self.ref_id)
        if vrt_base is not None:
            bad |= real & uq.is_vrt[:, None] & (ids < vrt_base)
        if bool(bad.any()):
            q, k = (int(i) for i in bad.nonzero()[0])
            kind = "a VRT" if bool(uq.is_vrt[q]) else "<REF>"
            raise ValueError(
                f"sample {int(uq.sample[q])}: target token at position {int(pos[q, k])} should "
                f"be {kind} but holds id {int(ids[q, k])} (positions must be absolute columns "
                "of hidden / input_ids)"
            )

    def _queries(self, uq: UnitQueries, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(queries [Nt, C], object of each query [Nt], object_index or None)``."""
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
        return queries, obj, object_index

    def _object_images(
        self,
        uq: UnitQueries,
        input_ids: Tensor | None,
        image_index: Tensor | None,
        binding: ImageBinding | None,
        batch: int,
    ) -> Tensor:
        """Image (feature row) of each object ``[Q]``."""
        if image_index is not None:
            return image_index.cpu()[uq.sample]
        if binding is None:
            return uq.sample.clone()
        # Python lists: one lookup per object, no tensor op each.
        ids = input_ids.tolist() if input_ids is not None else None
        first = uq.positions[:, 0].tolist() if len(uq) else []
        images = []
        for s, p, vrt in zip(uq.sample.tolist(), first, uq.is_vrt.tolist()):
            own = binding.images_of(s)
            if not own:
                raise ValueError(f"sample {s} has a target but no image in the binding")
            image = own[0]
            if ids is not None and vrt:
                # A VRT run points at the image of its first patch.
                local = ids[s][p] - binding.vrt_base
                if 0 <= local < binding.num_patches_of(s):
                    image = binding.patch_of(s, local)[0]
            images.append(image)
        return torch.tensor(images, dtype=torch.int64)

    def forward(
        self,
        results: Sequence[ParseResult | Sequence[ParseResult]],
        hidden: Tensor,
        features: Sequence[Tensor],
        *,
        input_ids: Tensor | None = None,
        image_index: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        fine_features: Tensor | None = None,
        padding_masks: Sequence[Tensor] | None = None,
        binding: ImageBinding | None = None,
    ) -> dict[str, RoutedPredictions]:
        """Route and decode.

        Args:
            results: per sample, the :class:`ParseResult` of its answer parsed from token ids
                (``trp.grammar.parse_ids``), or a list of them (answer turns). Positions are
                absolute columns of ``hidden`` (and ``input_ids``).
            hidden (Tensor[B, T, C]): LM hidden states (last layer).
            features: L maps ``[B_img, C_l, H_l, W_l]``, one row per image.
            input_ids (Tensor[B, T], optional): the tokens ``hidden`` was computed from: checks
                every target position (with ``ref_id`` / ``vrt_base``) and, with ``binding``,
                gives each VRT run its reference box.
            image_index (Tensor[B], int64, optional): image of each sample. Default: with a
                ``binding``, each VRT run's image is its first patch's image and a ``<REF>``'s
                its sample's first image; without, sample b -> image b.
            image_size, fine_features, padding_masks: passed to the heads in
                :class:`HeadInputs` (``padding_masks``: L bool ``[B_img, H_l, W_l]``).
            binding: the batch's :class:`trp.vrt.ImageBinding` (images per sample, each
                image's grid).
        Returns:
            unit -> :class:`RoutedPredictions` for every head (possibly empty).
        """
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            raise ValueError("hidden must be a Tensor[B, T, C]")
        batch = hidden.shape[0]
        if len(results) != batch:
            raise ValueError(f"got {len(results)} parse results for {batch} samples")
        if image_index is not None and (
            not isinstance(image_index, Tensor)
            or image_index.dtype != torch.int64
            or image_index.shape != (batch,)
        ):
            raise ValueError(f"image_index must be int64 of shape [{batch}]")
        if input_ids is not None and tuple(input_ids.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"input_ids must be [B, T] = {list(hidden.shape[:2])}, got {list(input_ids.shape)}"
            )
        if binding is not None and binding.num_samples != batch:
            raise ValueError(f"binding has {binding.num_samples} samples for {batch}")
        vrt_base = (
            self.vrt_base if self.vrt_base is not None else getattr(binding, "vrt_base", None)
        )
        if self.route == "all":
            every = route_targets(results)
            shared = _concat(list(every.values()), "all")
            routed = dict.fromkeys(self.heads, shared)
        else:
            routed = route_targets(results, units=list(self.heads))
        ids_cpu = input_ids.cpu() if input_ids is not None else None
        cache: dict[int, HeadInputs] = {}
        out = {}
        for unit, head in self.heads.items():
            uq = routed[unit]
            inputs = cache.get(id(uq))
            if inputs is None:
                if ids_cpu is not None:
                    self._check_tokens(uq, ids_cpu, vrt_base)
                queries, obj, object_index = self._queries(uq, hidden)
                images = self._object_images(uq, ids_cpu, image_index, binding, batch)
                refs = None
                if binding is not None and ids_cpu is not None:
                    refs = run_reference_boxes(ids_cpu, uq.sample, uq.positions, binding)
                    refs = refs.to(device=hidden.device)
                inputs = HeadInputs(
                    queries=queries,
                    features=features,
                    image_index=images[obj].to(hidden.device),
                    object_index=object_index,
                    image_size=image_size,
                    reference_boxes=refs,
                    fine_features=fine_features,
                    padding_masks=padding_masks,
                )
                cache[id(uq)] = inputs
            out[unit] = RoutedPredictions(
                unit=unit,
                predictions=head(inputs),
                sample=uq.sample,
                triplet=uq.triplet,
                instance=uq.instance,
                group=triplet_group(uq.sample, uq.triplet),
                concepts=uq.concepts,
                is_vrt=uq.is_vrt,
            )
        return out
