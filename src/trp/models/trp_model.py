"""``TRPForConditionalGeneration``: a host VLM + VRTs + routed decoder heads — the one model.

The recipes train this class and users build it around their own VLM; there is one path for
training, generation, saving and loading:

* the **host** is a Hugging Face ``PreTrainedModel`` with ``GenerationMixin`` and an
  ``encode_images(pixel_values) -> ImageEncoding`` (the reference VLM,
  :class:`trp.models.ReferenceVLMForConditionalGeneration`, is one); its vision side runs once
  per step and its tokens fill the prompt's image placeholders (``image_embeds``);
* :class:`trp.vrt.VRTCausalLM` binds each batch's patches as tokens the LM reads and emits;
* :class:`trp.heads.DecoderRouter` turns the hidden states at the parsed target tokens into one
  :class:`trp.heads.HeadInputs` and runs the unit heads;
* generation is the host's own ``generate`` with trp's logits processors; the hidden states at
  the targets come out of that generation (:attr:`trp.vrt.VRTGeneration.hidden`), with absolute
  positions the router checks against the tokens.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trp.grammar import REF, TokenVocab, TRPLogitsProcessor, parse_ids
from trp.grammar.types import ParseResult
from trp.heads import DecoderRouter, RoutedPredictions
from trp.models.image_encoding import ImageEncoding
from trp.vrt import ImageBinding, VRTCausalLM, VRTContext, VRTPrototypes, vrt_token_loss

__all__ = ["TRPForConditionalGeneration", "TRPGeneration", "TRPOutput", "shift_positions"]

_CONFIG_NAME = "trp_config.json"
_HEADS_NAME = "heads.safetensors"


@dataclass(frozen=True)
class TRPOutput:
    """Teacher-forced forward of :class:`TRPForConditionalGeneration`.

    ``hidden`` [B, L, D] (position t predicts token t + 1), ``vrt_rows`` [ΣP, D] (the VRT
    classifier rows), ``binding``, ``images`` (the :class:`ImageEncoding`) and ``predictions``
    (unit -> :class:`trp.heads.RoutedPredictions`).
    """

    hidden: Tensor
    vrt_rows: Tensor
    binding: ImageBinding
    images: ImageEncoding
    predictions: dict[str, RoutedPredictions]


@dataclass(frozen=True)
class TRPGeneration:
    """Output of :meth:`TRPForConditionalGeneration.generate`.

    ``ids`` [R, T] the generated tokens (``pad_id`` after the end); ``texts`` and ``parses``
    (strict, positions absolute in ``sequences``; ``None`` where the answer does not parse,
    with the reason in ``parse_errors``); ``predictions`` (unit -> RoutedPredictions of the
    parsed targets); ``sequences`` [R, L + T] prompt + answer; ``rows_per_image``: R / B.
    """

    ids: Tensor
    texts: tuple[str, ...]
    parses: tuple[ParseResult | None, ...]
    parse_errors: tuple[str | None, ...]
    predictions: dict[str, RoutedPredictions]
    sequences: Tensor
    rows_per_image: int


def shift_positions(result: ParseResult, by: int) -> ParseResult:
    """``result`` with every target position moved by ``by`` (answer -> sequence columns)."""
    if result.positions is None:
        raise ValueError("the parse has no token positions: parse token ids (parse_ids)")
    positions = tuple(
        tuple(tuple(p + by for p in target) for target in triplet) for triplet in result.positions
    )
    return dataclasses.replace(result, positions=positions)


class TRPForConditionalGeneration(nn.Module):
    """A VLM that answers in TRP and decodes its targets with unit heads.

    Args:
        vlm: the host ``PreTrainedModel`` (see the module docstring).
        tokenizer: its tokenizer with the TRP tokens; ``len(tokenizer)`` is the first VRT id.
        heads: unit -> head (the :mod:`trp.heads` interface: ``head(HeadInputs) -> dict``).
        prototype_rank, prototype_zero_init: of :class:`trp.vrt.VRTPrototypes`.
        contextual_vrt: score VRTs against :class:`trp.vrt.VRTContext` rows (the prototypes
            plus the LM's last states at the image tokens).
        vrt_query_shift: which state of a VRT is its query: 1 = the state that emitted it
            (PaDT), 0 = the state at the VRT itself.
        detach_queries: the heads read the LM's states without training the LM through them.
        route: ``"all"`` (every head decodes every target, PaDT) or ``"unit"`` (per triplet).
        image_token: the prompt's image placeholder token.
        config: plain settings saved with the model (how to rebuild its heads and host).
    """

    def __init__(
        self,
        *,
        vlm: nn.Module,
        tokenizer: Any,
        heads: Mapping[str, nn.Module],
        prototype_rank: int = 64,
        prototype_zero_init: bool = True,
        contextual_vrt: bool = False,
        vrt_query_shift: int = 1,
        detach_queries: bool = False,
        route: str = "all",
        image_token: str = "<image>",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(vlm, "encode_images") or not hasattr(vlm, "generate"):
            raise TypeError(
                f"{type(vlm).__name__} is not a trp host: it needs encode_images() and "
                "generate() (a transformers PreTrainedModel with GenerationMixin)"
            )
        self.tokenizer = tokenizer
        self.vocab = TokenVocab.from_tokenizer(tokenizer)
        vrt_base = len(tokenizer)
        rows = int(vlm.get_input_embeddings().weight.shape[0])
        if rows < vrt_base:
            raise ValueError(
                f"the LM has {rows} embedding rows, the tokenizer {vrt_base} tokens: "
                "resize the embeddings (trp.grammar.resize_embeddings) first"
            )
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {image_token!r}")
        self.image_token_id = int(image_id)
        width = int(vlm.get_input_embeddings().weight.shape[1])
        self.vrt = VRTCausalLM(
            model=vlm,
            prototypes=VRTPrototypes(dim=width, rank=prototype_rank, zero_init=prototype_zero_init),
            vrt_base=vrt_base,
            context=VRTContext(dim=width) if contextual_vrt else None,
            image_token_id=self.image_token_id,
        )
        self.ref_id = int(tokenizer.convert_tokens_to_ids(REF))
        self.router = DecoderRouter(
            dict(heads), shift=vrt_query_shift, route=route, ref_id=self.ref_id, vrt_base=vrt_base
        )
        self.detach_queries = bool(detach_queries)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.config = dict(config or {})
        # The host's processor (HF VLMs): saved with the tokenizer so one directory loads.
        self.processor: Any = None

    # ------------------------------------------------------------------ accessors
    @property
    def vlm(self) -> nn.Module:
        return self.vrt.model

    @property
    def heads(self) -> nn.ModuleDict:
        return self.router.heads

    @property
    def vrt_base(self) -> int:
        return self.vrt.vrt_base

    @property
    def image_size(self) -> tuple[int, int]:
        """The host's fixed input size ``(H, W)`` (hosts with dynamic resolution have none)."""
        size = getattr(self.vlm, "image_size", None)
        if size is None:
            raise AttributeError(f"{type(self.vlm).__name__} has no fixed image size")
        return (int(size[0]), int(size[1]))

    @property
    def text_weight(self) -> Tensor:
        """The LM head's text rows ``[V, D]`` (what the token loss scores text against)."""
        return self.vlm.get_output_embeddings().weight[: self.vrt_base]

    def binding_of(self, images: ImageEncoding, rows_per_image: int = 1) -> ImageBinding:
        """One sample per image (each repeated ``rows_per_image`` times)."""
        grids = [list(g) for g in images.grids for _ in range(rows_per_image)]
        return ImageBinding.from_grids(grids, [1] * len(grids), vrt_base=self.vrt_base)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        parses: Sequence[ParseResult],
        **image_inputs: Any,
    ) -> TRPOutput:
        """Teacher-forced forward over full conversations; ``parses`` hold the answers'
        targets at absolute positions of ``input_ids``; ``image_inputs`` are the host
        processor's other image tensors (e.g. Qwen's ``image_grid_thw``)."""
        images = self.vlm.encode_images(pixel_values, **image_inputs)
        binding = self.binding_of(images)
        with self.vrt.bind(binding=binding, features=images.flat_tokens, input_ids=input_ids):
            hidden = self.vlm.language_states(input_ids, attention_mask, images)  # B x L x D
            rows = self.vrt.rows
        if rows is None:
            raise RuntimeError(
                f"{type(self.vlm).__name__}.language_states did not run the decoder that "
                "get_decoder() returns: the contextual VRT rows were never computed"
            )
        predictions = self.decode(parses, hidden, input_ids, images, binding)
        return TRPOutput(hidden, rows, binding, images, predictions)

    def decode(
        self,
        parses: Sequence[ParseResult],
        hidden: Tensor,
        input_ids: Tensor,
        images: ImageEncoding,
        binding: ImageBinding,
        image_index: Tensor | None = None,
    ) -> dict[str, RoutedPredictions]:
        """Route the parsed targets' states in ``hidden`` to the heads."""
        # detach_queries: the LM learns object choice from the token loss alone.
        queries_from = hidden.detach() if self.detach_queries else hidden
        return self.router(
            list(parses),
            queries_from,
            list(images.maps),
            input_ids=input_ids,
            image_index=image_index,
            image_size=images.image_size,
            fine_features=images.fine,
            padding_masks=images.padding_masks,
            binding=binding,
        )

    def token_loss(
        self,
        out: TRPOutput,
        labels: Tensor,
        objects: Sequence[tuple[Sequence[int], Tensor]] | None = None,
    ) -> Tensor:
        """:func:`trp.vrt.vrt_token_loss` of a forward's states."""
        return vrt_token_loss(
            out.hidden,
            labels,
            text_weight=self.text_weight,
            vrt_rows=out.vrt_rows,
            binding=out.binding,
            objects=objects,
        )

    def logits(self, out: TRPOutput) -> Tensor:
        """The dense logits ``[B, L, vrt_base + P_max]`` over text ⊕ each sample's own patches
        of a forward (for inspection; the loss never builds them)."""
        return self.vlm.get_output_embeddings().vrt(
            out.hidden, prototypes=out.vrt_rows, binding=out.binding
        )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int = 32,
        constrained: bool = True,
        allow_ref: bool = True,
        allow_vrt: bool = True,
        forced_prefix: Sequence[Sequence[int]] | None = None,
        image_inputs: dict[str, Any] | None = None,
        **generate_kwargs: Any,
    ) -> TRPGeneration:
        """Answer left-padded prompts ``[B, L]`` with the host's ``generate`` (greedy by
        default; any ``generate_kwargs`` such as ``num_beams``, ``do_sample``,
        ``num_return_sequences``) and decode the parsed targets with the heads.

        ``forced_prefix`` (one token list per sample) is emitted verbatim first: a grounding
        evaluation forces ``<Phrase>expression</Phrase>(<Unit>box</Unit>`` so the model
        localises the given phrase (Kosmos-2's REC protocol). ``image_inputs``: the host
        processor's other image tensors (e.g. ``image_grid_thw``).
        """
        from transformers import LogitsProcessorList

        from trp.grammar import ForcedPrefixLogitsProcessor

        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError("input_ids and attention_mask must both be [B, L]")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded (the last column is padding)")
        b = input_ids.shape[0]
        images = self.vlm.encode_images(pixel_values, **(image_inputs or {}))
        if images.num_images != b:
            raise ValueError(f"{images.num_images} images for {b} prompts (one image each)")
        binding = self.binding_of(images)
        processors = LogitsProcessorList()
        if constrained:
            processors.append(
                TRPLogitsProcessor(
                    tokenizer=self.tokenizer,
                    eos_token_id=self.eos_id,
                    vocab=self.vocab,
                    vrt_mask=binding.own_image_mask(),
                    max_new_tokens=max_new_tokens,
                    allow_ref=allow_ref,
                    allow_vrt=allow_vrt,
                    # Masking in place skips a [rows, V] copy per step (6-10 ms at 150k x 16);
                    # only output_logits keeps the scores tensor and needs it untouched.
                    inplace=not generate_kwargs.get("output_logits", False),
                )
            )
        if forced_prefix is not None:
            if len(forced_prefix) != b:
                raise ValueError(
                    f"forced_prefix needs one token list per sample ({b}), got {len(forced_prefix)}"
                )
            longest = max((len(p) for p in forced_prefix), default=0)
            if longest >= max_new_tokens:
                raise ValueError(
                    f"a forced prefix of {longest} tokens leaves no room in "
                    f"max_new_tokens={max_new_tokens}"
                )
            processors.append(
                ForcedPrefixLogitsProcessor(forced_prefix, prompt_len=input_ids.shape[1])
            )
        kwargs = {"do_sample": False, **generate_kwargs}
        with self.vrt.bind(binding=binding, features=images.flat_tokens, input_ids=input_ids):
            gen = self.vrt.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **images.host_inputs,
                logits_processor=processors,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                **kwargs,
            )
        rows = gen.sequences.shape[0]
        per = rows // b
        start = gen.prompt_length
        new = gen.sequences[:, start:]
        texts, parses, errors = [], [], []
        for row in new.tolist():
            end = row.index(self.eos_id) if self.eos_id in row else len(row)
            body = row[:end]
            texts.append(self.vocab.decode(body))
            try:
                parses.append(
                    shift_positions(parse_ids(body, vocab=self.vocab, strict=True), start)
                )
                errors.append(None)
            except ValueError as err:
                parses.append(None)
                errors.append(str(err))
        failed = sum(e is not None for e in errors)
        if failed:
            warnings.warn(
                f"{failed} of {rows} answers do not parse (see TRPGeneration.parse_errors)",
                stacklevel=2,
            )
        empty = ParseResult(triplets=(), texts=("",), positions=())
        image_index = torch.arange(b, device=new.device).repeat_interleave(per)
        predictions = self.decode(
            [p if p is not None else empty for p in parses],
            gen.hidden,
            gen.sequences[:, :-1],
            images,
            self.binding_of(images, per),
            image_index=image_index,
        )
        new = new.masked_fill(_after_eos(new, self.eos_id), self.pad_id)
        return TRPGeneration(
            ids=new,
            texts=tuple(texts),
            parses=tuple(parses),
            parse_errors=tuple(errors),
            predictions=predictions,
            sequences=gen.sequences,
            rows_per_image=per,
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the whole model to ``directory``: ``vlm/`` (the host's ``save_pretrained``
        plus the VRT modules), ``heads.safetensors``, ``tokenizer/`` and ``trp_config.json``.
        Safetensors only; :meth:`from_pretrained` rebuilds it in a fresh process."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vrt.save_pretrained(directory / "vlm")
        save_model(self.router, str(directory / _HEADS_NAME))
        (self.processor or self.tokenizer).save_pretrained(str(directory / "tokenizer"))
        (directory / _CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TRPForConditionalGeneration:
        """Load what :meth:`save_pretrained` wrote (weights loaded strictly)."""
        from trp.models.build import build_model_from_saved

        return build_model_from_saved(Path(directory))


def _after_eos(ids: Tensor, eos: int) -> Tensor:
    """``[R, T]`` bool: positions after each row's first EOS."""
    seen = (ids == eos).long().cumsum(1)
    return (seen - (ids == eos).long()) > 0
