"""Add visual reference tokens to a Hugging Face causal LM or VLM without copying its code.

:class:`VRTCausalLM` swaps the model's input embedding for a :class:`VRTEmbedding` and its LM head
for a :class:`VRTHead`, both reading the *current binding* set by :meth:`VRTCausalLM.bind`. The
model's own ``forward`` and ``generate`` run unmodified (batched, left padding, KV cache): VRT
ids ``>= vrt_base`` embed as their image's prototypes, logits cover text ⊕ the sample's own
patches, and generated ids are read by :func:`trp.grammar.parse_ids`::

    vlm = VRTCausalLM(model=hf_model, vrt_base=vrt_base_of(tokenizer))
    with vlm.bind_images(pixel_values=..., image_grid_thw=..., images_per_sample=[1, 2]):
        out = vlm.generate(input_ids=..., attention_mask=..., max_new_tokens=32)
    out.sequences, out.vrt_hidden  # ids, and per row the hidden states that emitted each VRT
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trp.vrt.binding import ImageBinding
from trp.vrt.embedding import VRTEmbedding
from trp.vrt.head import VRTHead
from trp.vrt.prototypes import VRTPrototypes

__all__ = ["VRTCausalLM", "VRTGeneration"]

_CONFIG_NAME = "vrt_config.json"
_WEIGHTS_NAME = "vrt_prototypes.pt"


class _State:
    """The binding the swapped modules read; one per wrapper."""

    def __init__(self) -> None:
        self.binding: ImageBinding | None = None
        self.prototypes: Tensor | None = None
        self.capture: list[Tensor] | None = None


class _BoundEmbedding(nn.Module):
    """Stands in for the model's ``embed_tokens``: ``input_ids -> embeddings`` with VRTs."""

    def __init__(self, *, embedding: VRTEmbedding, state: _State) -> None:
        super().__init__()
        self.vrt = embedding
        self._state = state

    @property
    def weight(self) -> Tensor:
        return self.vrt.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        s = self._state
        return self.vrt(input_ids, prototypes=s.prototypes, binding=s.binding)


class _BoundHead(nn.Module):
    """Stands in for the model's ``lm_head``: ``hidden -> logits`` over text ⊕ own patches."""

    def __init__(self, *, head: VRTHead, state: _State) -> None:
        super().__init__()
        self.vrt = head
        self._state = state

    @property
    def weight(self) -> Tensor:
        return self.vrt.weight

    def forward(self, hidden: Tensor) -> Tensor:
        s = self._state
        if s.capture is not None:
            # The last position's state predicts the next token: the one that emits it.
            s.capture.append(hidden[:, -1].detach())
        return self.vrt(hidden, prototypes=s.prototypes, binding=s.binding)


@dataclass(frozen=True)
class VRTGeneration:
    """Result of :meth:`VRTCausalLM.generate`.

    Attributes:
        sequences (Tensor[R, L]): prompt + generated ids (VRTs are ``vrt_base + k``).
        prompt_length (int): columns of the prompt.
        vrt_positions (list[Tensor[K_r]]): per row, columns of ``sequences`` holding VRTs.
        vrt_hidden (list[Tensor[K_r, D]]): per row, the last hidden state of the step that
            emitted each VRT (PaDT: the decoders' input).
    """

    sequences: Tensor
    prompt_length: int
    vrt_positions: list[Tensor]
    vrt_hidden: list[Tensor]


class VRTCausalLM(nn.Module):
    """A Hugging Face causal LM / VLM whose vocabulary is extended per sample with VRTs.

    Wrapping replaces ``model.get_input_embeddings()`` and ``model.get_output_embeddings()`` in
    place (``model`` itself keeps working; :meth:`unwrap` restores it). Tied and untied heads
    both work; the prototypes are the VRT rows on both sides.

    Args:
        model: a transformers ``PreTrainedModel`` with input and output embeddings.
        prototypes: the patch-feature → prototype module (default: a fresh
            :class:`VRTPrototypes` at the LM width, which starts at zero).
        vrt_base: id of ``<|VRT_0|>`` (``trp.grammar.vrt_base_of(tokenizer)``); default: the
            embedding table's row count.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        prototypes: nn.Module | None = None,
        vrt_base: int | None = None,
    ) -> None:
        super().__init__()
        for name in ("get_input_embeddings", "get_output_embeddings", "set_input_embeddings"):
            if not hasattr(model, name):
                raise TypeError(f"model must be a transformers model (missing {name})")
        text_embedding = model.get_input_embeddings()
        text_head = model.get_output_embeddings()
        if isinstance(text_embedding, _BoundEmbedding):
            raise ValueError("model is already wrapped by a VRTCausalLM")
        if text_head is None:
            raise ValueError("model has no output embeddings (LM head)")
        self.model = model
        self._state = _State()
        self.vrt_base = VRTEmbedding(text_embedding=text_embedding, vrt_base=vrt_base).vrt_base
        dim = int(text_embedding.weight.shape[1])
        self.prototypes = prototypes if prototypes is not None else VRTPrototypes(dim=dim)
        self._originals = (text_embedding, text_head)
        self._rewrap()

    # ------------------------------------------------------------------ binding
    @property
    def binding(self) -> ImageBinding | None:
        return self._state.binding

    @contextlib.contextmanager
    def bind(self, *, binding: ImageBinding, features: Tensor) -> Iterator[Tensor]:
        """Bind a batch: ``features (Tensor[ΣP, D])`` are its merged patch features at the LM
        width (any source for a plain LM). Yields the prototypes ``Tensor[ΣP, D]`` (computed
        once; differentiable, so a training step may run inside the block)."""
        if not isinstance(binding, ImageBinding):
            raise TypeError(f"binding must be an ImageBinding, got {type(binding).__name__}")
        if binding.vrt_base != self.vrt_base:
            raise ValueError(
                f"binding.vrt_base={binding.vrt_base} but the model uses {self.vrt_base}"
            )
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError("features must be a Tensor[ΣP, D]")
        if features.shape[0] != binding.total_patches:
            raise ValueError(
                f"features have {features.shape[0]} rows, the binding {binding.total_patches}"
            )
        if self._state.binding is not None:
            raise RuntimeError("a binding is already active; bindings do not nest")
        weight = self._originals[0].weight
        protos = self.prototypes(features.to(device=weight.device, dtype=weight.dtype))
        self._state.binding, self._state.prototypes = binding, protos
        try:
            yield protos
        finally:
            self._state.binding = self._state.prototypes = None

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Merged patch features ``Tensor[ΣP, D]`` from a Qwen2.5-VL-style visual encoder."""
        get = getattr(self.model, "get_image_features", None)
        if get is None:
            raise TypeError(f"{type(self.model).__name__} has no visual encoder; use bind()")
        out = get(pixel_values, image_grid_thw, return_dict=True)
        pooled = getattr(out, "pooler_output", out)
        return torch.cat(list(pooled), dim=0) if isinstance(pooled, list | tuple) else pooled

    def bind_images(
        self,
        *,
        pixel_values: Tensor,
        image_grid_thw: Tensor,
        images_per_sample: Sequence[int] | Tensor,
    ) -> contextlib.AbstractContextManager[Tensor]:
        """:meth:`bind` for a Qwen2.5-VL-style VLM: features from its visual encoder, binding
        from ``image_grid_thw`` and the config's ``spatial_merge_size``."""
        vision = getattr(self.model.config, "vision_config", None)
        merge = int(getattr(vision, "spatial_merge_size", 1))
        binding = ImageBinding.from_grid_thw(
            image_grid_thw, images_per_sample, vrt_base=self.vrt_base, spatial_merge_size=merge
        )
        return self.bind(
            binding=binding, features=self.image_features(pixel_values, image_grid_thw)
        )

    def own_image_mask(self) -> Tensor:
        """The active binding's ``[B, max_patches]`` mask for ``TRPLogitsProcessor``."""
        if self._state.binding is None:
            raise RuntimeError("no binding is active")
        return self._state.binding.own_image_mask()

    # ------------------------------------------------------------------ running
    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def generate(self, **kwargs: Any) -> VRTGeneration:
        """``model.generate(**kwargs)`` that also returns the hidden states that emitted VRTs.

        Greedy or sampling (beam search reorders rows, so the captured states would not follow
        the beams; run a forward pass over the result instead).
        """
        if int(kwargs.get("num_beams", 1)) != 1:
            raise ValueError("VRTCausalLM.generate captures hidden states only without beams")
        prompt = kwargs.get("input_ids")
        if prompt is None:
            raise ValueError("generate needs input_ids")
        self._state.capture = []
        try:
            out = self.model.generate(**kwargs)
            steps = self._state.capture
        finally:
            self._state.capture = None
        sequences = out if isinstance(out, Tensor) else out.sequences
        start = prompt.shape[1]
        new = sequences[:, start:]
        hidden = torch.stack(steps[: new.shape[1]], dim=1)  # R x N x D
        positions, states = [], []
        for r in range(sequences.shape[0]):
            cols = (new[r] >= self.vrt_base).nonzero().flatten()
            positions.append(cols + start)
            states.append(hidden[r, cols])
        return VRTGeneration(sequences, start, positions, states)

    # ------------------------------------------------------------------ persistence
    def unwrap(self) -> nn.Module:
        """Put the model's original embedding and LM head back; returns the model."""
        embedding, head = self._originals
        self.model.set_input_embeddings(embedding)
        self.model.set_output_embeddings(head)
        return self.model

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """``model.save_pretrained(path)`` (original modules, so any transformers code loads
        it) plus the prototype module and ``vrt_base``."""
        path = Path(path)
        model = self.unwrap()
        try:
            model.save_pretrained(path, **kwargs)
        finally:
            self._rewrap()
        torch.save(self.prototypes.state_dict(), path / _WEIGHTS_NAME)
        config: dict[str, Any] = {"vrt_base": self.vrt_base}
        if isinstance(self.prototypes, VRTPrototypes):
            config["rank"] = self.prototypes.down.out_features
        (path / _CONFIG_NAME).write_text(json.dumps(config))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model_class: Any, **kwargs: Any) -> VRTCausalLM:
        """Load what :meth:`save_pretrained` wrote (``model_class.from_pretrained(path)``)."""
        path = Path(path)
        if not (path / _CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{path / _CONFIG_NAME} not found: not a VRTCausalLM checkpoint"
            )
        config = json.loads((path / _CONFIG_NAME).read_text())
        model = model_class.from_pretrained(path, **kwargs)
        dim = int(model.get_input_embeddings().weight.shape[1])
        prototypes = VRTPrototypes(dim=dim, rank=int(config.get("rank", 64)))
        prototypes.load_state_dict(torch.load(path / _WEIGHTS_NAME, weights_only=True))
        weight = model.get_input_embeddings().weight
        prototypes.to(device=weight.device, dtype=weight.dtype)
        return cls(model=model, prototypes=prototypes, vrt_base=int(config["vrt_base"]))

    def _rewrap(self) -> None:
        embedding, head = self._originals
        self.model.set_input_embeddings(
            _BoundEmbedding(
                embedding=VRTEmbedding(text_embedding=embedding, vrt_base=self.vrt_base),
                state=self._state,
            )
        )
        self.model.set_output_embeddings(
            _BoundHead(head=VRTHead(text_head=head, vrt_base=self.vrt_base), state=self._state)
        )
