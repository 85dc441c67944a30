"""``ReferringVLM``: a vision encoder + a causal LM answering in TRP with VRT or ``<REF>`` targets.

Data flow (one image per sample, ``N = h * w`` patches):

1. ``vision(images)`` -> patch features ``[B, N, C_v]`` (prefix tokens dropped) -> map
   ``[B, C_v, h, w]``;
2. ``adapter`` projects the map to the LM width and adds fixed 2-D sine-cosine positions; these
   patch tokens replace the ``N`` ``<image>`` placeholders of the prompt;
3. ``prototypes`` turn the patch tokens into per-image VRT embeddings / classifier rows, bound to
   their sample by an :class:`trp.vrt.ImageBinding`; :class:`trp.vrt.VRTEmbedding` and
   :class:`trp.vrt.VRTHead` extend the LM's input embedding and LM head with them;
4. the answer is parsed (:func:`trp.grammar.parse_ids`) and its targets routed per unit
   (:func:`trp.grammar.route_targets`); the hidden states of each target (the state that
   *emitted* each VRT, or the state at each ``<REF>``) are the queries of the heads, which read
   the vision feature map.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trp.grammar import REF, TokenVocab, TRPLogitsProcessor, parse_ids, route_targets
from trp.grammar.types import ParseResult
from trp.heads import FeatureAdapter
from trp.vrt import ImageBinding, VRTContext, VRTEmbedding, VRTHead, VRTPrototypes

__all__ = ["Generation", "ReferringVLM", "TargetQueries"]


@dataclass(frozen=True)
class TargetQueries:
    """The decoder queries of a batch: one object per parsed target.

    ``queries`` [Nq, D] hidden states; ``image_index`` [Nq] image of each query; ``object_index``
    [Nq] object (0..Q-1) of each query; ``sample``/``triplet``/``instance``/``is_vrt`` [Q] per
    object; ``units``: the unit of each object; ``reference_boxes`` [Q, 4] normalised cxcywh:
    for a VRT run, the box around the patches it names (the prior a box head refines), NaN for
    ``<REF>`` targets or when the token ids were not given.
    """

    queries: Tensor
    image_index: Tensor
    object_index: Tensor
    sample: Tensor
    triplet: Tensor
    instance: Tensor
    is_vrt: Tensor
    units: tuple[str, ...]
    reference_boxes: Tensor

    def __len__(self) -> int:
        return int(self.sample.numel())


@dataclass(frozen=True)
class Generation:
    """Output of :meth:`ReferringVLM.generate`: generated ids ``[B, T]`` (padded with
    ``pad_id`` after the end), their texts and strict parses (``None`` for an answer that does
    not parse, e.g. cut by the length limit without the constraint)."""

    ids: Tensor
    texts: tuple[str, ...]
    parses: tuple[ParseResult | None, ...]


class ReferringVLM(nn.Module):
    """A reference VLM composed of a vision encoder, a Hugging Face causal LM and unit heads.

    Args:
        vision: module with ``forward_features(images [B, 3, H, W]) -> [B, P + N, C_v]`` and
            ``num_prefix_tokens`` (a timm ViT).
        language: a ``transformers`` causal LM (``model`` backbone + ``lm_head``), its vocabulary
            covering ``tokenizer``.
        tokenizer: the HF tokenizer with the TRP tokens and ``<image>`` (``vrt_base = len``).
        heads: ``unit -> head`` modules with the :mod:`trp.heads` interface.
        grid: the patch grid ``(h, w)`` of the vision encoder; image_size: ``(H, W)``.
        prototype_rank: low-rank width of :class:`trp.vrt.VRTPrototypes`;
            prototype_zero_init: its ``zero_init``.
        vrt_query_shift: which hidden state of a VRT is its query: 1 = the state that emitted
            it (PaDT), 0 = the state at the VRT itself (it has also read the VRT's own
            prototype, so it carries the patch it names).
        contextual_vrt: score VRTs against :class:`trp.vrt.VRTContext` rows (the prototypes
            plus the LM's last states at the patch tokens) instead of the prototypes alone.
    """

    def __init__(
        self,
        *,
        vision: nn.Module,
        language: nn.Module,
        tokenizer,
        heads: Mapping[str, nn.Module],
        grid: tuple[int, int],
        image_size: tuple[int, int],
        vision_dim: int,
        prototype_rank: int = 64,
        prototype_zero_init: bool = True,
        vrt_query_shift: int = 1,
        detach_queries: bool = False,
        fine_stem: nn.Module | None = None,
        contextual_vrt: bool = False,
    ) -> None:
        super().__init__()
        if vrt_query_shift not in (0, 1):
            raise ValueError(f"vrt_query_shift must be 0 or 1, got {vrt_query_shift!r}")
        self.vrt_query_shift = vrt_query_shift
        self.detach_queries = bool(detach_queries)
        self.vision = vision
        self.language = language
        self.tokenizer = tokenizer
        self.heads = nn.ModuleDict(dict(heads))
        self.fine_stem = fine_stem
        # Units whose head accepts the VRT reference boxes / fine features (looked up once).
        params = {u: inspect.signature(h.forward).parameters for u, h in self.heads.items()}
        self._takes_reference = {u for u, p in params.items() if "reference_boxes" in p}
        self._takes_fine = {u for u, p in params.items() if "fine_features" in p}
        self.vision_dim = int(vision_dim)
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        width = int(language.config.hidden_size)
        self.adapter = FeatureAdapter(in_channels=[vision_dim], d_model=width)
        self.prototypes = VRTPrototypes(
            dim=width, rank=prototype_rank, zero_init=prototype_zero_init
        )
        self.vrt_context = VRTContext(dim=width) if contextual_vrt else None
        self.vrt_base = len(tokenizer)
        if language.get_input_embeddings().weight.shape[0] < self.vrt_base:
            raise ValueError(
                f"the LM has {language.get_input_embeddings().weight.shape[0]} embedding rows, "
                f"the tokenizer {self.vrt_base} tokens; resize the embeddings first"
            )
        self.embed = VRTEmbedding(
            text_embedding=language.get_input_embeddings(), vrt_base=self.vrt_base
        )
        self.lm_head = VRTHead(text_head=language.get_output_embeddings(), vrt_base=self.vrt_base)
        self.vocab = TokenVocab.from_tokenizer(tokenizer)
        self.image_id = int(tokenizer.convert_tokens_to_ids("<image>"))
        self.ref_id = int(tokenizer.convert_tokens_to_ids(REF))
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    # ------------------------------------------------------------------ image side
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``images [B, 3, H, W]`` -> (vision map ``[B, C_v, h, w]``, patch tokens ``[B, N, D]``,
        prototypes ``[B * N, D]``)."""
        return self._encode(images)[:3]

    def _encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """:meth:`encode_images` plus :meth:`fine_features`. When the ViT's patch embedding
        runs the fine stem (``vision.conv_stem``), its output is taken from that run instead of
        running the stem a second time (~30 ms of a 0.39 s training step at batch 32)."""
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images must be [B, 3, {self.image_size[0]}, "
                f"{self.image_size[1]}], got {list(images.shape)}"
            )
        ran: list[Tensor] = []
        hook = (
            self.fine_stem.register_forward_hook(lambda _m, _i, out: ran.append(out))
            if self.fine_stem is not None
            else None
        )
        try:
            tokens = self.vision.forward_features(images)[:, self.vision.num_prefix_tokens :]
        finally:
            if hook is not None:
                hook.remove()
        b, n, c = tokens.shape
        if n != self.num_patches:
            raise ValueError(f"the vision encoder gave {n} patches, the grid is {self.grid}")
        fmap = tokens.transpose(1, 2).reshape(b, c, *self.grid)  # B x C_v x h x w
        adapted = self.adapter([fmap])
        patches = adapted.flat + adapted.flat_pos  # B x N x D
        fine = ran[0] if len(ran) == 1 else self.fine_features(images)
        return fmap, patches, self.prototypes(patches.reshape(b * n, -1)), fine

    def binding(self, batch_size: int) -> ImageBinding:
        return ImageBinding.from_grids(
            [list(self.grid)] * batch_size, [1] * batch_size, vrt_base=self.vrt_base
        )

    def embed_inputs(
        self, input_ids: Tensor, patches: Tensor, prototypes: Tensor, binding: ImageBinding
    ) -> Tensor:
        """Token embeddings ``[B, L, D]``: text rows, VRT prototypes, and the patch tokens at the
        ``<image>`` placeholders (each sample holds exactly ``N`` of them, or none)."""
        embeds = self.embed(input_ids, prototypes=prototypes, binding=binding)
        is_image = input_ids == self.image_id  # B x L
        if bool(is_image.any()):
            counts = is_image.sum(1)
            if bool(((counts != 0) & (counts != self.num_patches)).any()):
                raise ValueError(
                    f"each prompt needs {self.num_patches} <image> tokens "
                    f"(or none), got {counts.tolist()}"
                )
            rows = counts > 0
            embeds = embeds.masked_scatter(is_image[..., None], patches[rows].to(embeds.dtype))
        return embeds

    def vrt_rows(self, hidden: Tensor, input_ids: Tensor, prototypes: Tensor) -> Tensor:
        """The VRT classifier rows ``[B * N, D]``: the prototypes, or with ``contextual_vrt`` the
        :class:`trp.vrt.VRTContext` of the prototypes and ``hidden [B, L, D]`` (the LM's last
        states) at the ``<image>`` positions of ``input_ids [B, L]``."""
        if self.vrt_context is None:
            return prototypes
        states = self.image_states(hidden, input_ids, purpose="contextual VRT rows")
        return self.vrt_context(prototypes, states.flatten(0, 1))

    def image_states(self, hidden: Tensor, input_ids: Tensor, *, purpose: str) -> Tensor:
        """``hidden [B, L, D]`` at the ``<image>`` positions of ``input_ids [B, L]`` ->
        ``[B, N, D]`` (patch order); every prompt must hold the ``N`` image tokens
        (``purpose`` names the caller in the error)."""
        is_image = input_ids == self.image_id  # B x L
        counts = is_image.sum(1)
        if bool((counts != self.num_patches).any()):
            raise ValueError(
                f"{purpose} need {self.num_patches} <image> tokens in every prompt, "
                f"got {counts.tolist()}"
            )
        return hidden[is_image.to(hidden.device)].reshape(len(counts), self.num_patches, -1)

    # ------------------------------------------------------------------ language side
    def hidden_states(self, embeds: Tensor, attention_mask: Tensor, **kwargs):
        """Run the LM backbone; returns its output (``last_hidden_state`` ``[B, L, D]``)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language.model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    def vrt_reference_boxes(self, ids: Tensor, sample: Tensor, positions: Tensor) -> Tensor:
        """Box around the patches a VRT run names, ``-> Tensor[Q, 4]`` normalised cxcywh.

        ``ids`` [B, L] token ids, ``sample`` [Q] and ``positions`` [Q, K] (padded with -1) the
        runs' tokens. The box covers the run's first patch and the patches connected to it
        (8-neighbourhood, through the run's patches): a stray VRT elsewhere in the image does
        not stretch it. A row with no VRT among its tokens is NaN.
        """
        gh, gw = self.grid
        tok = ids.cpu()[sample.cpu()[:, None], positions.cpu().clamp(min=0)]  # Q x K
        local = tok - self.vrt_base  # one image per sample: VRT k is its patch k
        valid = (positions.cpu() >= 0) & (local >= 0) & (local < self.num_patches)
        boxes = torch.full((len(sample), 4), float("nan"))
        for q, (row_ids, row_valid) in enumerate(zip(local.tolist(), valid.tolist())):
            cells = [(p // gw, p % gw) for p, v in zip(row_ids, row_valid) if v]
            if not cells:
                continue
            cluster, rest = [cells[0]], cells[1:]
            grew = True
            while grew:
                near = [c for c in rest if any(_adjacent(c, d) for d in cluster)]
                grew = bool(near)
                cluster += near
                rest = [c for c in rest if c not in near]
            rows, cols = [c[0] for c in cluster], [c[1] for c in cluster]
            x0, x1 = min(cols) / gw, (max(cols) + 1) / gw
            y0, y1 = min(rows) / gh, (max(rows) + 1) / gh
            boxes[q] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        return boxes

    def target_queries(
        self, parses: Sequence[ParseResult], hidden: Tensor, ids: Tensor | None = None
    ) -> TargetQueries:
        """Gather the decoder queries of every parsed target from ``hidden [B, L, D]``; with the
        token ``ids [B, L]`` also the reference box of each VRT run."""
        routed = route_targets(list(parses))
        feats, image_index, object_index = [], [], []
        sample, triplet, instance, is_vrt, units, refs = [], [], [], [], [], []
        offset = 0
        for unit, uq in routed.items():
            if not len(uq):
                continue
            # A VRT is fed by the state that emitted it (one position earlier) or by its own
            # state (vrt_query_shift); a <REF> by its own.
            shift = self.vrt_query_shift * uq.is_vrt.long()[:, None] * (uq.positions >= 0).long()
            shifted = dataclasses.replace(uq, positions=uq.positions - shift)
            f, valid = shifted.gather(hidden)  # Q x K x D
            q = len(uq)
            obj = torch.arange(q)[:, None].expand_as(valid)
            feats.append(f[valid])
            object_index.append(obj[valid.cpu()] + offset)
            image_index.append(uq.sample[:, None].expand_as(valid)[valid.cpu()])
            sample.append(uq.sample)
            triplet.append(uq.triplet)
            instance.append(uq.instance)
            is_vrt.append(uq.is_vrt)
            units.extend([unit] * q)
            refs.append(
                self.vrt_reference_boxes(ids, uq.sample, uq.positions)
                if ids is not None
                else torch.full((q, 4), float("nan"))
            )
            offset += q
        dev = hidden.device
        if not feats:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return TargetQueries(
                hidden.new_zeros(0, hidden.shape[-1]),
                empty,
                empty,
                empty,
                empty,
                empty,
                empty.bool(),
                (),
                hidden.new_zeros(0, 4, dtype=torch.float32),
            )
        return TargetQueries(
            queries=torch.cat(feats),
            image_index=torch.cat(image_index).to(dev),
            object_index=torch.cat(object_index).to(dev),
            sample=torch.cat(sample).to(dev),
            triplet=torch.cat(triplet).to(dev),
            instance=torch.cat(instance).to(dev),
            is_vrt=torch.cat(is_vrt).to(dev),
            units=tuple(units),
            reference_boxes=torch.cat(refs).to(dev),
        )

    def fine_features(self, images: Tensor) -> Tensor | None:
        """The ``fine_stem`` map of ``images`` ``[B, C, H/4, W/4]`` (``None`` without a stem)."""
        return self.fine_stem(images) if self.fine_stem is not None else None

    def decode_targets(
        self,
        targets: TargetQueries,
        fmap: Tensor,
        units: Sequence[str] | None = None,
        fine: Tensor | None = None,
    ) -> dict[str, dict]:
        """Run every head in ``units`` (default: all) on every target -> ``unit -> output``;
        ``fine`` is :meth:`fine_features` of the images."""
        out = {}
        for unit in units if units is not None else list(self.heads):
            # Heads that take them get the reference box of each VRT run (NaN: none) and the
            # fine features.
            head = self.heads[unit]
            extra: dict[str, Tensor] = {}
            if unit in self._takes_reference:
                extra["reference_boxes"] = targets.reference_boxes
            if unit in self._takes_fine and fine is not None:
                extra["fine_features"] = fine
            out[unit] = head(
                targets.queries,
                [fmap],
                targets.image_index,
                object_index=targets.object_index,
                image_size=self.image_size,
                **extra,
            )
        return out

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        parses: Sequence[ParseResult],
    ) -> dict:
        """Teacher-forced forward.

        Returns ``fmap`` (the vision map ``[B, C_v, h, w]``), ``hidden`` ``[B, L, D]``
        (position t predicts token t + 1; the token loss is
        computed from it without materialising logits, see
        :func:`trp.ops.vrt_linear_cross_entropy`), ``prototypes`` ``[B * N, D]`` (the VRT input
        embeddings), ``vrt_rows`` ``[B * N, D]`` (their classifier rows, :meth:`vrt_rows`),
        ``binding``,
        ``targets`` (:class:`TargetQueries`) and ``heads`` (unit -> head output, every head on
        every target).
        """
        fmap, patches, prototypes, fine = self._encode(images)
        binding = self.binding(images.shape[0])
        embeds = self.embed_inputs(input_ids, patches, prototypes, binding)
        hidden = self.hidden_states(embeds, attention_mask).last_hidden_state  # B x L x D
        # detach_queries: the heads read the LM's states without training the LM through them.
        queries_from = hidden.detach() if self.detach_queries else hidden
        targets = self.target_queries(parses, queries_from, input_ids)
        return {
            "fmap": fmap,
            "hidden": hidden,
            "prototypes": prototypes,
            "vrt_rows": self.vrt_rows(hidden, input_ids, prototypes),
            "binding": binding,
            "targets": targets,
            "heads": self.decode_targets(targets, fmap, fine=fine),
        }

    def logits(self, hidden: Tensor, vrt_rows: Tensor, binding: ImageBinding) -> Tensor:
        """``[B, L, D]`` -> logits ``[B, L, vrt_base + N]`` over text ⊕ the sample's patches
        (``vrt_rows``: :meth:`vrt_rows`, the prototypes without ``contextual_vrt``)."""
        return self.lm_head(hidden, prototypes=vrt_rows, binding=binding)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int = 32,
        constrained: bool = True,
        allow_ref: bool = True,
        allow_vrt: bool = True,
        forced_prefix: Sequence[Sequence[int]] | None = None,
    ) -> tuple[Generation, dict]:
        """Greedy decoding (KV cache), optionally grammar-constrained, then decoding of the
        parsed targets by every head.

        ``input_ids`` are left-padded prompts ``[B, L]`` ending with the answer turn's start.
        ``forced_prefix`` (one token list per sample) is emitted verbatim before the model
        continues: a grounding evaluation forces ``<Phrase>expression</Phrase>(<Unit>box</Unit>``
        so the model localises the given phrase. The prefixes are part of the answer (``ids``,
        ``texts``, parses); they must be valid answer prefixes under the grammar.
        Returns the :class:`Generation` and ``{"targets": TargetQueries, "heads": ...}``.
        """
        from transformers import DynamicCache

        b = images.shape[0]
        forced, forced_len = _pad_prefixes(forced_prefix, b, self.pad_id, max_new_tokens)
        fmap, patches, prototypes, fine = self._encode(images)
        binding = self.binding(b)
        processor = None
        if constrained:
            processor = TRPLogitsProcessor(
                tokenizer=self.tokenizer,
                eos_token_id=self.eos_id,
                vocab=self.vocab,
                vrt_mask=binding.own_image_mask(),
                max_new_tokens=max_new_tokens,
                allow_ref=allow_ref,
                allow_vrt=allow_vrt,
            )
        cache = DynamicCache()
        embeds = self.embed_inputs(input_ids, patches, prototypes, binding)
        mask = attention_mask.clone()
        out = self.hidden_states(embeds, mask, past_key_values=cache, use_cache=True)
        # The patch tokens lie in the prompt: their states, hence the VRT rows, are final now.
        rows = self.vrt_rows(out.last_hidden_state, input_ids, prototypes)
        ids = input_ids
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        last = out.last_hidden_state[:, -1:]
        for step in range(max_new_tokens):
            scores = self.lm_head(last, prototypes=rows, binding=binding)[:, -1].float()
            if processor is not None:
                scores = processor(ids.cpu(), scores.cpu()).to(scores.device)
            nxt = scores.argmax(-1)
            if forced is not None and step < forced.shape[1]:
                nxt = torch.where(step < forced_len, forced[:, step].to(nxt.device), nxt)
            nxt = nxt.masked_fill(done, self.pad_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done = done | (nxt == self.eos_id)
            mask = torch.cat([mask, (~done | (nxt == self.eos_id))[:, None].to(mask.dtype)], 1)
            if bool(done.all()):
                break
            position_ids = mask.long().sum(-1, keepdim=True) - 1
            step = self.embed_inputs(nxt[:, None], patches, prototypes, binding)
            last = self.language.model(
                inputs_embeds=step,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        new = ids[:, input_ids.shape[1] :]
        texts, parses = [], []
        for row in new.tolist():
            end = row.index(self.eos_id) if self.eos_id in row else len(row)
            body = row[:end]
            texts.append(self.vocab.decode(body))
            try:
                parses.append(parse_ids(body, vocab=self.vocab, strict=True))
            except ValueError:
                parses.append(None)
        gen = Generation(ids=new, texts=tuple(texts), parses=tuple(parses))
        # The full sequence once more without cache: the hidden states at every target token.
        full_mask = torch.cat([attention_mask, (new != self.pad_id).to(attention_mask.dtype)], 1)
        embeds = self.embed_inputs(
            ids.masked_fill(full_mask == 0, self.pad_id), patches, prototypes, binding
        )
        hidden = self.hidden_states(embeds, full_mask).last_hidden_state
        prompt_len = input_ids.shape[1]
        shifted = [_shift_positions(p, prompt_len) if p is not None else _EMPTY for p in parses]
        targets = self.target_queries(shifted, hidden, ids)
        heads = self.decode_targets(targets, fmap, fine=fine)
        return gen, {"targets": targets, "heads": heads}


def _pad_prefixes(
    prefixes: Sequence[Sequence[int]] | None, batch: int, pad_id: int, max_new_tokens: int
) -> tuple[Tensor | None, Tensor | None]:
    """Forced answer prefixes as ``([B, P] ids, [B] lengths)`` (``(None, None)`` without)."""
    if prefixes is None:
        return None, None
    if len(prefixes) != batch:
        raise ValueError(
            f"forced_prefix needs one token list per sample ({batch}), got {len(prefixes)}"
        )
    lengths = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    longest = int(lengths.max()) if batch else 0
    if longest >= max_new_tokens:
        raise ValueError(
            f"a forced prefix of {longest} tokens leaves no room in max_new_tokens={max_new_tokens}"
        )
    ids = torch.full((batch, max(longest, 1)), pad_id, dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        ids[row, : len(prefix)] = torch.as_tensor(list(prefix), dtype=torch.long)
    return ids, lengths


def _adjacent(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1


_EMPTY = ParseResult(triplets=(), texts=("",), positions=())


def _shift_positions(result: ParseResult, by: int) -> ParseResult:
    assert result.positions is not None
    positions = tuple(
        tuple(tuple(p + by for p in target) for target in triplet) for triplet in result.positions
    )
    return ParseResult(
        triplets=result.triplets,
        texts=result.texts,
        task=result.task,
        diagnostics=result.diagnostics,
        spans=result.spans,
        offsets=result.offsets,
        positions=positions,
    )
