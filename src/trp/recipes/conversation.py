"""Referring samples -> encoded conversations: prompts, TRP answers, targets (a collate function).

A sample (``trp.data.ShapesDataset`` with ``task="rec"``/``"res"``, or ``RefCOCODataset``) has
``image``, ``expression``, ``box`` (xyxy pixels) and ``mask``. Its conversation is

    user:      <image> x N  "\\n"  "Locate <expression>."   (or "Segment ..." for the mask unit)
    assistant: <Phrase>expression</Phrase>(<Unit>box</Unit><|VRT_a|><|VRT_b|>...).

with the VRT run sampled from the object's target patches (:mod:`trp.vrt`), or a single
``[0]<REF>`` slot when ``target="ref"``. The unit alternates with the sample index so both
prompts are learned; every head is trained on every target (both ground truths are known).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from trp.data import collate
from trp.grammar import (
    IMAGE,
    UNIT_CLOSE,
    ChatTemplate,
    TokenVocab,
    encode_conversation,
    encode_text,
    format_rec,
)
from trp.heads import quarter_size
from trp.vrt import mask_coverage, sample_target_patches, target_patches

__all__ = [
    "PROMPTS",
    "TARGET_KINDS",
    "HFReferringCollator",
    "ReferringCollator",
    "clean_expression",
    "pad_conversations",
    "patch_classes",
]

PROMPTS: dict[str, str] = {"box": "Locate {}.", "mask": "Segment {}."}
TARGET_KINDS: tuple[str, ...] = ("vrt", "ref")
_FORBIDDEN = ("<", ">", "[", "]", "(", ")", "|", "\n")


def clean_expression(text: str) -> str:
    """An expression safe inside ``<Phrase>``: grammar characters removed, spaces collapsed."""
    for ch in _FORBIDDEN:
        text = text.replace(ch, " ")
    return " ".join(text.split()) or "object"


def pad_conversations(encoded: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """Right-pad encoded conversations (``trp.grammar.encode_conversation``) into a batch:
    ``input_ids``, ``attention_mask``, ``labels`` [B, L] and the answers' ``parses``."""
    length = max(e.input_ids.numel() for e in encoded)
    b = len(encoded)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = e.input_ids.numel()
        input_ids[i, :n], labels[i, :n], attention[i, :n] = e.input_ids, e.labels, 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "parses": [e.answers[0] for e in encoded],
    }


def patch_classes(class_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``class_map`` [B, H, W] (0 background, 1 + class) -> ``[B, h * w]`` int64: the label
    covering the most pixels of each patch of the ``grid``."""
    b, h, w = class_map.shape
    if h % grid[0] or w % grid[1]:
        raise ValueError(f"a {h}x{w} class map does not split into a {grid} patch grid")
    if class_map.is_floating_point() or (class_map.numel() and int(class_map.min()) < 0):
        raise ValueError("class_map must hold integer labels >= 0 (0 background, 1 + class)")
    gh, gw = grid
    k = int(class_map.max()) + 1 if class_map.numel() else 1
    # A histogram of labels per patch in one bincount (this runs in the collator, on the
    # training process's cores): key = (sample, patch row, patch col, label).
    rows = torch.arange(h) // (h // gh)
    cols = torch.arange(w) // (w // gw)
    patch = (rows[:, None] * gw + cols[None, :]).flatten()  # H*W
    key = (torch.arange(b)[:, None] * (gh * gw) + patch[None, :]) * k + class_map.reshape(b, -1)
    area = torch.bincount(key.flatten(), minlength=b * gh * gw * k).view(b, gh * gw, k)
    return area.argmax(-1)


class ReferringCollator:
    """Collate referring samples into a model batch.

    Args:
        tokenizer: HF tokenizer with the TRP tokens and ``<image>``.
        grid: patch grid ``(h, w)``; image_size: ``(H, W)`` of the images.
        target: ``"vrt"`` (VRT runs) or ``"ref"`` (``<REF>`` slots).
        num_vrt: VRTs per object (sampled each call, PaDT's ``"padt"`` mode).
        with_answers: encode the answers (training); otherwise left-padded prompts only.
        units: the units prompts alternate between.
        prompt_first: put the instruction before the image tokens instead of after them: in a
            causal LM the patch tokens can then read the expression, so each patch's state can
            tell whether it is the referent before the answer looks for it.

    Returns batches with ``images`` [B, 3, H, W], ``input_ids``/``attention_mask`` [B, L]
    (right-padded full conversations, or left-padded prompts plus ``answer_prefix``, each
    prompt's :meth:`answer_prefix_ids`), ``labels`` [B, L] (-100 outside
    the answers), ``parses`` (answer parses, positions in sequence coordinates), ``objects``
    (per sample, its label positions and all target patches, for the robust token loss),
    ``boxes`` [B, 4] normalised cxcywh, ``boxes_xyxy`` [B, 4] pixels, ``masks`` [B, H, W] bool,
    ``masks_small`` [B, H/4, W/4] float, ``units``, ``expressions``, ``index`` and, when every
    sample has a ``class_map`` (synthetic scenes), ``patch_classes`` [B, N] (see
    :func:`patch_classes`).
    """

    def __init__(
        self,
        *,
        tokenizer,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        target: str = "vrt",
        num_vrt: int = 4,
        with_answers: bool = True,
        units: Sequence[str] = ("box", "mask"),
        prompt_first: bool = False,
    ) -> None:
        if target not in TARGET_KINDS:
            raise ValueError(f"target must be one of {TARGET_KINDS}, got {target!r}")
        if num_vrt < 1:
            raise ValueError(f"num_vrt must be >= 1, got {num_vrt}")
        unknown = [u for u in units if u not in PROMPTS]
        if unknown or not units:
            raise ValueError(f"units must be a non-empty subset of {sorted(PROMPTS)}")
        self.tokenizer = tokenizer
        self.vocab = TokenVocab.from_tokenizer(tokenizer)
        self.template = ChatTemplate()
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.target = target
        self.num_vrt = num_vrt
        self.with_answers = with_answers
        self.units = tuple(units)
        self.prompt_first = bool(prompt_first)
        self.pad_id = int(tokenizer.pad_token_id)
        self.image_text = IMAGE * (self.grid[0] * self.grid[1])
        self.unit_close_id = int(tokenizer.convert_tokens_to_ids(UNIT_CLOSE))

    def unit_of(self, index: int) -> str:
        return self.units[index % len(self.units)]

    def user_text(self, expression: str, unit: str) -> str:
        instruction = PROMPTS[unit].format(expression)
        if self.prompt_first:
            return f"{instruction}\n{self.image_text}"
        return f"{self.image_text}\n{instruction}"

    def answer_text(self, expression: str, unit: str, patches: Sequence[int] | None) -> str:
        return format_rec(expression, unit=unit, patches=patches).text

    def answer_prefix_ids(self, expression: str, unit: str) -> list[int]:
        """The answer's tokens before its first target, ``<Phrase>expression</Phrase>(<Unit>unit
        </Unit>``, tokenised as the training answers are: what a grounding evaluation forces so
        the model localises the given phrase instead of re-writing it (Kosmos-2's protocol)."""
        text = self.answer_text(expression, unit, [0] if self.target == "vrt" else None)
        ids = encode_text(self.tokenizer, text, vrt_base=self.vocab.vrt_base)
        return ids[: ids.index(self.unit_close_id) + 1]

    def prompt_ids(self, expression: str, unit: str) -> list[int]:
        """The prompt up to the answer turn's start, tokenised as ``encode_conversation`` does."""
        t = self.template
        parts = (
            t.turn_start.format(role="user"),
            self.user_text(expression, unit),
            t.turn_end,
            t.turn_start.format(role=t.answer_role),
        )
        return [
            i for p in parts for i in encode_text(self.tokenizer, p, vrt_base=self.vocab.vrt_base)
        ]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        keep = ("image", "expression", "box", "mask", "index")
        with_classes = all("class_map" in s for s in samples)
        if with_classes:
            keep = (*keep, "class_map")
        batch = collate([{k: s[k] for k in keep} for s in samples])
        images, masks = batch["image"], batch["mask"]
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images must be {self.image_size}, got {tuple(images.shape[-2:])}; "
                "set the dataset's image_size"
            )
        h, w = self.image_size
        boxes_xyxy = batch["box"].float()
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        norm = boxes_xyxy / scale
        cxcywh = torch.stack(
            [
                (norm[:, 0] + norm[:, 2]) / 2,
                (norm[:, 1] + norm[:, 3]) / 2,
                norm[:, 2] - norm[:, 0],
                norm[:, 3] - norm[:, 1],
            ],
            dim=1,
        )
        small = F.interpolate(
            masks[:, None].float(), size=quarter_size(self.image_size), mode="area"
        )[:, 0]
        expressions = [clean_expression(str(e)) for e in batch["expression"]]
        indices = [int(i) for i in batch["index"].tolist()]
        units = [self.unit_of(i) for i in indices]
        out: dict[str, Any] = {
            "images": images,
            "pixel_values": images,
            "image_inputs": {},
            "boxes": cxcywh,
            "boxes_xyxy": boxes_xyxy,
            "masks": masks,
            "masks_small": small,
            "units": units,
            "expressions": expressions,
            "index": batch["index"],
        }
        if with_classes:
            out["patch_classes"] = patch_classes(batch["class_map"], self.grid)
        if self.with_answers:
            out.update(self._answers(images, masks, expressions, units))
        else:
            out.update(self._prompts(images, expressions, units))
        return out

    def target_run(self, mask: torch.Tensor, expr: str) -> tuple[torch.Tensor, list[int] | None]:
        """The object's target patches (all of them, for the robust loss) and, with VRT
        targets, the run its answer names (PaDT's sampling, deduplicated)."""
        allowed = target_patches(mask_coverage(mask, self.grid))
        if self.target != "vrt":
            return allowed, None
        if allowed.numel() == 0:
            raise ValueError(f"the object of {expr!r} has an empty mask")
        run = sample_target_patches(allowed, self.grid, num=self.num_vrt, mode="padt")
        return allowed, run.unique().tolist()

    def _answers(
        self, images: torch.Tensor, masks: torch.Tensor, expressions: list[str], units: list[str]
    ) -> dict[str, Any]:
        encoded, objects = [], []
        for mask, expr, unit in zip(masks, expressions, units):
            allowed, patches = self.target_run(mask, expr)
            messages = [
                {"role": "user", "content": self.user_text(expr, unit)},
                {"role": "assistant", "content": self.answer_text(expr, unit, patches)},
            ]
            enc = encode_conversation(
                self.tokenizer, messages, vocab=self.vocab, template=self.template
            )
            encoded.append(enc)
            positions = [p for triplet in enc.answers[0].positions for t in triplet for p in t]
            objects.append((positions if self.target == "vrt" else [], allowed))
        return {**pad_conversations(encoded, self.pad_id), "objects": objects}

    def _prompts(
        self, images: torch.Tensor, expressions: list[str], units: list[str]
    ) -> dict[str, Any]:
        prompts = [self.prompt_ids(e, u) for e, u in zip(expressions, units)]
        length = max(len(p) for p in prompts)
        b = len(prompts)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, length - len(p) :] = 1
        prefixes = [self.answer_prefix_ids(e, u) for e, u in zip(expressions, units)]
        return {"input_ids": input_ids, "attention_mask": attention, "answer_prefix": prefixes}


def uint8_images(images: torch.Tensor) -> list[torch.Tensor]:
    """``[B, 3, H, W]`` floats in [0, 1] -> one uint8 image per sample, as processors take them."""
    return [(img.clamp(0, 1) * 255).round().to(torch.uint8) for img in images]


class HFReferringCollator(ReferringCollator):
    """:class:`ReferringCollator` for a Hugging Face VLM: the host's processor applies its chat
    template and image processing (:func:`trp.models.hf_conversation.encode_hf_conversations`);
    ``grid`` is the processor's token grid for ``image_size`` images
    (:func:`trp.models.hf_conversation.token_grid`). Batches also carry ``pixel_values`` and
    ``image_inputs`` (e.g. ``image_grid_thw``) as the processor makes them.
    """

    def __init__(self, *, processor: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer=processor.tokenizer, **kwargs)
        self.processor = processor

    def _encode(self, images, prompts, answers=None) -> dict[str, Any]:
        from trp.models.hf_conversation import encode_hf_conversations

        return encode_hf_conversations(
            self.processor,
            uint8_images(images),
            prompts,
            answers,
            vocab=self.vocab,
            text_first=self.prompt_first,
        )

    def _answers(
        self, images: torch.Tensor, masks: torch.Tensor, expressions: list[str], units: list[str]
    ) -> dict[str, Any]:
        prompts, answers, allowed_all = [], [], []
        for mask, expr, unit in zip(masks, expressions, units):
            allowed, patches = self.target_run(mask, expr)
            prompts.append(PROMPTS[unit].format(expr))
            answers.append(self.answer_text(expr, unit, patches))
            allowed_all.append(allowed)
        enc = self._encode(images, prompts, answers)
        objects = []
        for parse, allowed in zip(enc["parses"], allowed_all):
            positions = [p for triplet in parse.positions for t in triplet for p in t]
            objects.append((positions if self.target == "vrt" else [], allowed))
        return {**enc, "objects": objects}

    def _prompts(
        self, images: torch.Tensor, expressions: list[str], units: list[str]
    ) -> dict[str, Any]:
        prompts = [PROMPTS[u].format(e) for e, u in zip(expressions, units)]
        enc = self._encode(images, prompts)
        prefixes = [self.answer_prefix_ids(e, u) for e, u in zip(expressions, units)]
        return {**enc, "answer_prefix": prefixes}
