"""Add visual reference tokens to a Hugging Face causal LM or VLM without copying its code.

:class:`VRTCausalLM` swaps the model's input embedding for a :class:`VRTEmbedding` and its LM head
for a :class:`VRTHead`, both reading the *current binding* set by :meth:`VRTCausalLM.bind`. The
model's own ``forward`` and ``generate`` run unmodified (batched, left padding, KV cache): VRT
ids ``>= vrt_base`` embed as their image's prototypes, logits cover text ⊕ the sample's own
patches, and generated ids are read by :func:`trp.grammar.parse_ids`::

    vlm = VRTCausalLM(model=hf_model, vrt_base=vrt_base_of(tokenizer))
    with vlm.bind_images(pixel_values=..., image_grid_thw=..., images_per_sample=[1, 2]):
        out = vlm.generate(input_ids=..., attention_mask=..., max_new_tokens=32)
    out.sequences, out.hidden  # ids, and the last hidden state at every position but the last

The hidden states come out of the generation itself (a forward hook on the host's decoder
records each step's last hidden state), so no second forward pass reads them; with beams they
follow the final beams through ``beam_indices``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
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
_WEIGHTS_NAME = "vrt_modules.safetensors"


class _State:
    """The binding the swapped modules read; one per wrapper."""

    def __init__(self) -> None:
        self.binding: ImageBinding | None = None
        self.prototypes: Tensor | None = None
        # Output-side VRT rows: the prototypes, or the contextual rows once the decoder ran.
        self.rows: Tensor | None = None
        # [B, L] bool: the bound prompts' image-token positions (contextual rows read them).
        self.image_positions: Tensor | None = None
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
        return self.vrt(hidden, prototypes=s.rows, binding=s.binding)


@dataclass(frozen=True)
class VRTGeneration:
    """Result of :meth:`VRTCausalLM.generate`.

    Attributes:
        sequences (Tensor[R, S]): prompt + generated ids (VRTs are ``vrt_base + k``).
        prompt_length (int): columns of the prompt.
        hidden (Tensor[R, S - 1, D]): the last hidden state at every position but the last
            (the last token is never fed back); column ``t`` is the state *at* token ``t``,
            which also predicted token ``t + 1``. Positions are absolute columns of
            ``sequences``, so parses shifted by ``prompt_length`` index it directly.
        vrt_positions (list[Tensor[K_r]]): per row, columns of ``sequences`` holding VRTs.
        vrt_hidden (list[Tensor[K_r, D]]): per row, the state of the step that emitted each
            VRT (PaDT: the decoders' input), ``hidden[r, vrt_positions[r] - 1]``.
        output: transformers' own generate output (scores, beam indices, …).
    """

    sequences: Tensor
    prompt_length: int
    hidden: Tensor
    vrt_positions: list[Tensor]
    vrt_hidden: list[Tensor]
    output: Any = None


class VRTCausalLM(nn.Module):
    """A Hugging Face causal LM / VLM whose vocabulary is extended per sample with VRTs.

    Wrapping replaces ``model.get_input_embeddings()`` and ``model.get_output_embeddings()`` in
    place (``model`` itself keeps working; :meth:`unwrap` restores it) and puts a forward hook
    on the model's decoder (``model.get_decoder()``) that is idle without a binding. Tied and
    untied heads both work; the prototypes are the VRT input rows, and the classifier rows are
    the prototypes or, with ``context``, :class:`trp.vrt.VRTContext` of the prototypes and the
    decoder's last states at the image tokens.

    Args:
        model: a transformers ``PreTrainedModel`` with input and output embeddings.
        prototypes: the patch-feature → prototype module (default: a fresh
            :class:`VRTPrototypes` at the LM width, which starts at zero).
        vrt_base: id of ``<|VRT_0|>`` (``trp.grammar.vrt_base_of(tokenizer)``); default: the
            embedding table's row count.
        context: optional :class:`trp.vrt.VRTContext` (contextual classifier rows; needs
            ``image_token_id`` and the prompts' ids at :meth:`bind`).
        image_token_id: the host's image placeholder id (for ``context``).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        prototypes: nn.Module | None = None,
        vrt_base: int | None = None,
        context: nn.Module | None = None,
        image_token_id: int | None = None,
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
        if context is not None and image_token_id is None:
            raise ValueError("context (contextual VRT rows) needs image_token_id")
        self.model = model
        self._state = _State()
        self.vrt_base = VRTEmbedding(text_embedding=text_embedding, vrt_base=vrt_base).vrt_base
        dim = int(text_embedding.weight.shape[1])
        self.prototypes = prototypes if prototypes is not None else VRTPrototypes(dim=dim)
        self.context = context
        self.image_token_id = image_token_id
        self._originals = (text_embedding, text_head)
        self._hook: Any = None
        self._rewrap()

    # ------------------------------------------------------------------ binding
    @property
    def binding(self) -> ImageBinding | None:
        return self._state.binding

    @property
    def rows(self) -> Tensor | None:
        """The active binding's VRT classifier rows ``Tensor[ΣP, D]`` (the prototypes, or the
        contextual rows once the decoder has run on the bound prompts)."""
        return self._state.rows

    @contextlib.contextmanager
    def bind(
        self, *, binding: ImageBinding, features: Tensor, input_ids: Tensor | None = None
    ) -> Iterator[Tensor]:
        """Bind a batch: ``features (Tensor[ΣP, D])`` are its merged patch features at the LM
        width (any source for a plain LM). Yields the prototypes ``Tensor[ΣP, D]`` (computed
        once; differentiable, so a training step may run inside the block). With ``context``,
        ``input_ids [B, L]`` are the prompts whose image tokens the contextual rows read."""
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
        positions = None
        if self.context is not None:
            if input_ids is None:
                raise ValueError("contextual VRT rows need the prompts' input_ids at bind()")
            positions = input_ids == self.image_token_id  # B x L
            counts = positions.sum(1)
            if bool((counts != binding.patches_per_sample.to(counts.device)).any()):
                raise ValueError(
                    f"contextual VRT rows need one image token per patch: the prompts hold "
                    f"{counts.tolist()}, the binding {binding.patches_per_sample.tolist()}"
                )
        weight = self._originals[0].weight
        protos = self.prototypes(features.to(device=weight.device, dtype=weight.dtype))
        s = self._state
        s.binding, s.prototypes, s.image_positions = binding, protos, positions
        s.rows = protos if self.context is None else None
        try:
            yield protos
        finally:
            s.binding = s.prototypes = s.rows = s.image_positions = None

    def _on_decoder(self, _module: nn.Module, _args: Any, output: Any) -> None:
        """Forward hook on the decoder: records its last hidden state while generating and
        computes the contextual VRT rows from the first call over the bound prompts."""
        s = self._state
        if s.binding is None:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if s.rows is None and s.image_positions is not None:
            if hidden.shape[1] != s.image_positions.shape[1]:
                raise RuntimeError(
                    "the first decoder call after bind() must see the bound prompts "
                    f"({s.image_positions.shape[1]} positions), got {hidden.shape[1]}"
                )
            per = s.binding.rows_per_sample(hidden.shape[0])
            first = hidden[::per]  # B x L x D: expanded rows of a sample share their prompt
            states = first[s.image_positions.to(hidden.device)]  # ΣP x D, binding order
            s.rows = self.context(s.prototypes, states)
        if s.capture is not None:
            s.capture.append(hidden.detach())

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
        """``model.generate(**kwargs)`` (any mode: greedy, sampling, beams,
        ``num_return_sequences``) that also returns the hidden state at every position."""
        prompt = kwargs.get("input_ids")
        if prompt is None:
            raise ValueError("generate needs input_ids")
        if self._state.binding is None:
            raise RuntimeError("generate needs an active binding (use bind() / bind_images())")
        beams = int(kwargs.get("num_beams", 1))
        if beams > 1:
            # The final beams' states are gathered from every step's running rows.
            kwargs.update(return_dict_in_generate=True, output_scores=True)
        self._state.capture = []
        try:
            out = self.model.generate(**kwargs)
            steps = self._state.capture
        finally:
            self._state.capture = None
        sequences = out if isinstance(out, Tensor) else out.sequences
        start = prompt.shape[1]
        hidden = _assemble_hidden(steps, sequences.shape[1], getattr(out, "beam_indices", None))
        positions, states = [], []
        new = sequences[:, start:]
        for r in range(sequences.shape[0]):
            cols = (new[r] >= self.vrt_base).nonzero().flatten() + start
            positions.append(cols)
            states.append(hidden[r, cols - 1])
        return VRTGeneration(
            sequences, start, hidden, positions, states, None if isinstance(out, Tensor) else out
        )

    # ------------------------------------------------------------------ persistence
    def unwrap(self) -> nn.Module:
        """Put the model's original embedding and LM head back and remove the decoder hook;
        returns the model."""
        embedding, head = self._originals
        self.model.set_input_embeddings(embedding)
        self.model.set_output_embeddings(head)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return self.model

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """``model.save_pretrained(path)`` (original modules, so any transformers code loads
        it) plus the prototype (and context) modules in safetensors and ``vrt_base``."""
        from safetensors.torch import save_file

        path = Path(path)
        model = self.unwrap()
        try:
            model.save_pretrained(path, **kwargs)
        finally:
            self._rewrap()
        tensors = {f"prototypes.{k}": v for k, v in self.prototypes.state_dict().items()}
        if self.context is not None:
            tensors.update({f"context.{k}": v for k, v in self.context.state_dict().items()})
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path / _WEIGHTS_NAME)
        config: dict[str, Any] = {
            "vrt_base": self.vrt_base,
            "context": self.context is not None,
            "image_token_id": self.image_token_id,
        }
        if isinstance(self.prototypes, VRTPrototypes):
            config["rank"] = self.prototypes.down.out_features
        (path / _CONFIG_NAME).write_text(json.dumps(config))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model_class: Any, **kwargs: Any) -> VRTCausalLM:
        """Load what :meth:`save_pretrained` wrote (``model_class.from_pretrained(path)``)."""
        from safetensors.torch import load_file

        from trp.vrt.context import VRTContext

        path = Path(path)
        if not (path / _CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{path / _CONFIG_NAME} not found: not a VRTCausalLM checkpoint"
            )
        config = json.loads((path / _CONFIG_NAME).read_text())
        model = model_class.from_pretrained(path, **kwargs)
        dim = int(model.get_input_embeddings().weight.shape[1])
        tensors = load_file(str(path / _WEIGHTS_NAME))
        prototypes = VRTPrototypes(dim=dim, rank=int(config.get("rank", 64)))
        prototypes.load_state_dict(_sub(tensors, "prototypes."))
        context = None
        if config.get("context"):
            context = VRTContext(dim=dim)
            context.load_state_dict(_sub(tensors, "context."))
        weight = model.get_input_embeddings().weight
        for module in (prototypes, context):
            if module is not None:
                module.to(device=weight.device, dtype=weight.dtype)
        return cls(
            model=model,
            prototypes=prototypes,
            vrt_base=int(config["vrt_base"]),
            context=context,
            image_token_id=config.get("image_token_id"),
        )

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
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if decoder is None or decoder is self.model:
            warnings.warn(
                f"{type(self.model).__name__} has no separate decoder (get_decoder()): "
                "generate cannot record hidden states and contextual rows are unavailable",
                stacklevel=3,
            )
            return
        self._hook = decoder.register_forward_hook(self._on_decoder)


def _sub(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _assemble_hidden(steps: list[Tensor], length: int, beam_indices: Tensor | None) -> Tensor:
    """The decoder states recorded over a generation -> ``[R, length - 1, D]``.

    ``steps[0]`` is the prefill ``[R_run, L, D]``, ``steps[t]`` (t >= 1) the step that read
    generated token ``t - 1`` ``[R_run, 1, D]``. Without beams the running rows are the final
    rows; with beams, final row ``r`` took token ``t`` from running row ``beam_indices[r, t]``,
    whose state at step ``t`` is the state of ``r``'s prefix.
    """
    if not steps:
        raise RuntimeError("the decoder hook recorded nothing: does get_decoder() run?")
    prompt = steps[0].shape[1]
    needed = length - 1 - prompt  # generated tokens that were fed back
    steps = steps[: needed + 1]
    if beam_indices is None:
        return torch.cat(steps, dim=1)
    rows = beam_indices.shape[0]
    idx = beam_indices.clamp(min=0).to(steps[0].device)
    parts = [steps[0][idx[:, 0]]]
    for t in range(1, len(steps)):
        parts.append(steps[t][idx[:, min(t, idx.shape[1] - 1)]])
    out = torch.cat(parts, dim=1)
    return out[:rows]
