"""The unified multi-task recipe (``recipe=shapes_unified``): one model, every unit and task.

:class:`trp.data.UnifiedShapesDataset` draws REC, RES, detection (with negatives), instance
segmentation, keypoints, depth, region captions with a visual prompt, grounded captions and
text answers; :class:`UnifiedCollator` encodes them as conversations (``[VPT]`` placeholders
expanded to the prompt encoder's K tokens) with each unit's targets grouped by triplet;
:class:`UnifiedModule` trains the token loss plus every head that has targets in the batch
(:class:`trp.losses.RoutedCriterion`: a unit with nothing routed is skipped), splicing the
:class:`trp.vrt.VisualPromptEncoder`'s tokens into the LM input, and evaluates every task in
one pass into :class:`trp.metrics.UnifiedEvaluator`'s flat metrics dict.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F

from trp.data import (
    KEYPOINT_OKS_SIGMAS,
    MAX_KEYPOINTS,
    SHAPE_CLASSES,
    UNIFIED_TASKS,
    UnifiedShapesDataset,
    collate_unified,
)
from trp.grammar import IMAGE, VPT, ChatTemplate, TokenVocab, encode_conversation, encode_text
from trp.grammar.types import ParseResult
from trp.heads import DepthHead, quarter_size, triplet_group
from trp.losses import (
    BoxCriterion,
    DepthCriterion,
    KeypointCriterion,
    MaskCriterion,
    RoutedCriterion,
    box_cxcywh_to_xyxy,
)
from trp.metrics import UnifiedEvaluator
from trp.models.trp_model import TRPForConditionalGeneration, TRPOutput
from trp.recipes.conversation import pad_conversations, patch_classes, uint8_images
from trp.recipes.data import ReferringDataModule
from trp.recipes.module import (
    WarmupCosine,
    WarmupCosineAdamW,
    patch_class_loss,
    patch_probe,
)
from trp.recipes.overlays import draw_task_overlay
from trp.recipes.schema import (
    DataConfig,
    EvalConfig,
    LossConfig,
    OptimConfig,
    _Invalid,
    complete,
    register,
)
from trp.vrt import mask_coverage, target_patches
from trp.vrt.visual_prompt import VisualPromptEncoder, expand_vpt, splice_prompt_tokens

__all__ = [
    "HFUnifiedCollator",
    "PROMPT_ENCODER_FILE",
    "UnifiedCollator",
    "UnifiedDataConfig",
    "UnifiedDataModule",
    "UnifiedModule",
    "evaluate_unified",
    "task_table",
    "train_unified",
    "unified_corpus",
    "visual_prompts",
]

# The checkpoint file of the visual-prompt encoder (beside the model's files).
PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"


# --------------------------------------------------------------------------- config schema
# The tasks whose objects are named by VRT runs by default (the others have no object, or a
# depth map, which a run of patches cannot name).
_VRT_BY_DEFAULT = ("rec", "res", "det", "seg", "keypoints", "grounded_caption")


@dataclass
class UnifiedDataConfig(DataConfig):
    """``data=shapes_unified``: :class:`trp.data.UnifiedShapesDataset` (its arguments)."""

    name: str = "shapes_unified"
    train_size: int = 1000000
    seed: int = 0
    eval_seed: int = 1
    # true: the held-out set holds eval_size scenes of every task of the mixture.
    eval_per_task: bool = True
    min_shapes: int = 1
    max_shapes: int = 5
    # task -> sampling weight (tasks left out weigh 0).
    mixture: dict[str, float] = field(default_factory=lambda: dict.fromkeys(UNIFIED_TASKS, 1.0))
    # task -> "ref" (latent slots) or "vrt" (runs of patches); depth is always "ref". VRT runs
    # where a task grounds objects (they also give the heads reference boxes).
    targets: dict[str, str] = field(
        default_factory=lambda: {
            t: "vrt" if t in _VRT_BY_DEFAULT else "ref" for t in UNIFIED_TASKS
        }
    )
    num_vrt: int = 4
    empty_image_prob: float = 0.05
    negative_prob: float = 0.25
    max_query_classes: int = 2
    # Visual-prompt tokens K spliced in per [VPT] (trp.vrt.VisualPromptEncoder).
    prompt_tokens: int = 4
    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name != "shapes_unified":
            raise _Invalid(f"{{at}}name must be 'shapes_unified', got {self.name!r}")
        if self.seed == self.eval_seed:
            raise _Invalid("{at}seed and {at}eval_seed must differ (held-out scenes)")
        if self.prompt_tokens < 1:
            raise _Invalid(f"{{at}}prompt_tokens must be >= 1, got {self.prompt_tokens}")
        try:  # the dataset owns the checks of its arguments
            UnifiedShapesDataset(num_samples=1, **self.dataset_kwargs())
        except (ValueError, TypeError) as err:
            raise _Invalid(f"{{at}}: {err}") from None

    def dataset_kwargs(self) -> dict[str, Any]:
        return {
            "mixture": dict(self.mixture),
            "targets": dict(self.targets) or "ref",
            "num_vrt": self.num_vrt,
            "min_shapes": self.min_shapes,
            "max_shapes": self.max_shapes,
            "empty_image_prob": self.empty_image_prob,
            "negative_prob": self.negative_prob,
            "max_query_classes": self.max_query_classes,
        }


register("data", "shapes_unified_schema", UnifiedDataConfig)


def unified_corpus(dataset: UnifiedShapesDataset, *, num_samples: int) -> Iterator[str]:
    """Prompts and answers of the first ``num_samples`` samples (to train a tokenizer on)."""
    for i in range(min(num_samples, len(dataset))):
        s = dataset[i]
        yield f"user\n\n{s['prompt'].replace(VPT, ' ')}\nassistant\n"
        yield s["answer"]


# --------------------------------------------------------------------------- collation
class UnifiedCollator:
    """Unified samples -> a model batch.

    Args:
        tokenizer: HF tokenizer with the TRP tokens (``[VPT]`` included) and ``<image>``.
        grid: the patch grid ``(h, w)``; image_size: ``(H, W)``.
        num_prompt_tokens: K placeholders per ``[VPT]`` (:func:`trp.vrt.visual_prompt.expand_vpt`).
        with_answers: full conversations (training) or left-padded prompts (generation).
        prompt_first: the instruction before the image tokens.

    Batch keys: ``images`` [B, 3, H, W]; ``pixel_values`` and ``image_inputs`` (what the host
    VLM's forward takes: the images themselves and nothing for the reference VLM, the
    processor's tensors for a HF one); ``input_ids``/``attention_mask`` [B, L]; with answers
    ``labels`` [B, L], ``parses`` (sequence positions), ``objects`` (per sample the VRT label
    positions and the union of its objects' target patches, for the robust token loss) and
    ``targets`` (unit -> the criterion's targets, ``group`` = :func:`trp.heads.triplet_group`;
    masks at 1/4 resolution as float); ``patch_classes`` [B, h * w] (the label covering most of
    each patch, :func:`trp.recipes.conversation.patch_classes`); ``prompt_masks`` bool
    [P, H, W] and ``prompt_sample`` [P]; and ``samples`` (the collated samples,
    :func:`trp.data.collate_unified`).
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        num_prompt_tokens: int,
        with_answers: bool = True,
        prompt_first: bool = True,
    ) -> None:
        if num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
        self.tokenizer = tokenizer
        self.vocab = TokenVocab.from_tokenizer(tokenizer)
        self.template = ChatTemplate()
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_prompt_tokens = int(num_prompt_tokens)
        self.with_answers = bool(with_answers)
        self.prompt_first = bool(prompt_first)
        self.pad_id = int(tokenizer.pad_token_id)
        self.image_text = IMAGE * (self.grid[0] * self.grid[1])

    def user_text(self, prompt: str) -> str:
        instruction = expand_vpt(prompt, self.num_prompt_tokens)
        if self.prompt_first:
            return f"{instruction}\n{self.image_text}"
        return f"{self.image_text}\n{instruction}"

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt up to the answer turn's start, tokenised as ``encode_conversation`` does."""
        t = self.template
        parts = (
            t.turn_start.format(role="user"),
            self.user_text(prompt),
            t.turn_end,
            t.turn_start.format(role=t.answer_role),
        )
        return [
            i for p in parts for i in encode_text(self.tokenizer, p, vrt_base=self.vocab.vrt_base)
        ]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_unified(samples)
        images = batch["image"]
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images must be {self.image_size}, got {tuple(images.shape[-2:])}")
        prompt_sample = [i for i, t in enumerate(batch["prompt_type"]) if t]
        out: dict[str, Any] = {
            "images": images,
            "samples": batch,
            "prompt_masks": batch["prompt_mask"][prompt_sample],
            "prompt_sample": torch.tensor(prompt_sample, dtype=torch.long),
        }
        if "class_map" in batch:
            out["patch_classes"] = patch_classes(batch["class_map"], self.grid)
        if self.with_answers:
            out.update(self._answers(batch))
            out["targets"] = self._targets(batch)
        else:
            out.update(self._prompts(batch))
        return out

    def _answers(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded, objects = [], []
        for i, (prompt, answer) in enumerate(zip(batch["prompt"], batch["answer"])):
            messages = [
                {"role": "user", "content": self.user_text(prompt)},
                {"role": "assistant", "content": answer},
            ]
            enc = encode_conversation(
                self.tokenizer, messages, vocab=self.vocab, template=self.template
            )
            encoded.append(enc)
            objects.append(self.objects(enc.answers[0], batch["masks"][i]))
        return {
            **pad_conversations(encoded, self.pad_id),
            "pixel_values": batch["image"],
            "image_inputs": {},
            "objects": objects,
        }

    def objects(self, parse: ParseResult, masks: Tensor) -> tuple[list[int], Tensor]:
        """For the robust token loss: the answer's VRT label positions, and the patches any of
        the sample's objects (``masks`` [N, H, W]) covers."""
        positions = [
            p
            for triplet, pos in zip(parse.triplets, parse.positions or ())
            for target, tp in zip(triplet.targets, pos)
            if target.kind == "vrt"
            for p in tp
        ]
        allowed = [target_patches(mask_coverage(m, self.grid)) for m in masks]
        union = torch.cat(allowed).unique() if allowed else torch.zeros(0, dtype=torch.long)
        return positions, union

    def _targets(self, batch: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
        """unit -> criterion targets of the whole batch, each with its ``group``."""
        parts: dict[str, dict[str, list[Tensor]]] = {}
        small = quarter_size(self.image_size)
        for i, per_unit in enumerate(batch["targets"]):
            for unit, t in per_unit.items():
                dst = parts.setdefault(unit, {})
                g = triplet_group(torch.full_like(t["triplet"], i), t["triplet"])
                dst.setdefault("group", []).append(g)
                for key, value in t.items():
                    if key == "triplet":
                        continue
                    if key == "masks":
                        value = F.interpolate(value[:, None].float(), size=small, mode="area")[:, 0]
                    dst.setdefault(key, []).append(value)
        return {unit: {k: torch.cat(v) for k, v in d.items()} for unit, d in parts.items()}

    def _prompts(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = [self.prompt_ids(p) for p in batch["prompt"]]
        length = max(len(p) for p in ids)
        b = len(ids)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for i, p in enumerate(ids):
            input_ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, length - len(p) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": batch["image"],
            "image_inputs": {},
        }


class HFUnifiedCollator(UnifiedCollator):
    """:class:`UnifiedCollator` for a Hugging Face VLM: its processor applies the chat template
    and the image processing (:func:`trp.models.hf_conversation.encode_hf_conversations`,
    the instruction first with ``prompt_first``); ``grid`` is the processor's token grid
    (:func:`trp.models.hf_conversation.token_grid`). ``pixel_values`` and ``image_inputs``
    are the processor's."""

    def __init__(self, *, processor: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer=processor.tokenizer, **kwargs)
        self.processor = processor

    def _encode(self, batch: dict[str, Any], answers: Sequence[str] | None) -> dict[str, Any]:
        from trp.models.hf_conversation import encode_hf_conversations

        prompts = [expand_vpt(p, self.num_prompt_tokens) for p in batch["prompt"]]
        return encode_hf_conversations(
            self.processor,
            uint8_images(batch["image"]),
            prompts,
            answers,
            vocab=self.vocab,
            text_first=self.prompt_first,
        )

    def _answers(self, batch: dict[str, Any]) -> dict[str, Any]:
        enc = self._encode(batch, batch["answer"])
        objects = [self.objects(p, m) for p, m in zip(enc["parses"], batch["masks"])]
        return {**enc, "objects": objects}

    def _prompts(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self._encode(batch, None)


# --------------------------------------------------------------------------- prompt splicing
@contextlib.contextmanager
def visual_prompts(
    model: TRPForConditionalGeneration,
    encoder: VisualPromptEncoder,
    masks: Tensor,
    prompt_sample: Tensor,
    *,
    vpt_id: int,
) -> Iterator[None]:
    """Within the block, the model's input embedding writes the prompt tokens at ``[VPT]``.

    The host encodes the images once per call (``encode_images``); its vision map is kept and
    the prompts (``masks`` [P, H, W] of the rows ``prompt_sample`` [P]) are pooled from it when
    the LM embeds ``input_ids`` (a forward hook on the input embedding, so the host's own
    ``forward``/``generate`` run unchanged). Embedding calls without ``[VPT]`` (the decoding
    steps after the prompt) pass through.
    """
    if masks.shape[0] == 0:
        yield
        return
    vlm = model.vlm
    original = vlm.encode_images
    seen: dict[str, Any] = {}

    def encode_images(*args: Any, **kwargs: Any) -> Any:
        seen["images"] = original(*args, **kwargs)
        return seen["images"]

    def hook(module: Any, args: tuple, output: Tensor) -> Tensor:
        ids = args[0]
        if not bool((ids == vpt_id).any()):
            return output
        if "images" not in seen:
            raise RuntimeError("[VPT] tokens embedded before the images were encoded")
        images = seen["images"]
        padding = images.padding_masks[0] if images.padding_masks else None
        tokens = encoder(
            images.maps[0], masks.to(output.device), prompt_sample.to(output.device), padding
        )
        return splice_prompt_tokens(
            output, ids, tokens, vpt_id=vpt_id, prompt_sample=prompt_sample.to(ids.device)
        )

    vlm.encode_images = encode_images
    handle = vlm.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        del vlm.encode_images  # the instance attribute shadowed the method


# --------------------------------------------------------------------------- the module
def _criteria(units: Sequence[str], loss: Mapping[str, Any]) -> RoutedCriterion:
    make = {
        "box": lambda: BoxCriterion(
            weight_l1=float(loss["box_l1"]),
            weight_giou=float(loss["box_giou"]),
            weight_score=float(loss["box_score"]),
            # The light box head's box-region map, against the targets' masks.
            weight_region=float(loss["box_region"]),
            region_target=str(loss["box_region_target"]),
        ),
        "mask": lambda: MaskCriterion(
            weight_ce=float(loss["mask_ce"]),
            weight_dice=float(loss["mask_dice"]),
            num_points=int(loss["mask_points"]),
        ),
        "keypoint": lambda: KeypointCriterion(
            num_keypoints=MAX_KEYPOINTS, sigmas=KEYPOINT_OKS_SIGMAS
        ),
        "depth": lambda: DepthCriterion(),
    }
    unknown = [u for u in units if u not in make]
    if unknown:
        raise ValueError(f"no criterion for units {unknown}; known: {sorted(make)}")
    return RoutedCriterion({u: make[u]() for u in units})


class UnifiedModule(WarmupCosineAdamW):
    """Trains and evaluates a :class:`TRPForConditionalGeneration` on unified batches.

    Args:
        model: the model; its heads name the units trained (``box``, ``mask``, ``keypoint``,
            ``depth``), each with its trp.losses criterion through a :class:`RoutedCriterion`.
        optim: as :class:`trp.recipes.ReferringModule`'s.
        loss: ``token``, ``box_l1``, ``box_giou``, ``box_score``, ``box_region``, ``mask_ce``,
            ``mask_dice``, ``mask_points`` weights (keys left out: the schema's defaults;
            keypoint and depth criteria use their own).
        eval: ``max_new_tokens``, ``constrained``, ``mask_threshold``, ``threads``.
        num_prompt_tokens: K of the visual-prompt encoder.
        keep_overlays: held-out samples whose overlay is kept.
        num_patch_classes: labels of the batches' ``patch_classes`` (background included); with
            ``loss.patch_class`` or ``loss.patch_class_foreground`` > 0 a linear probe on the
            vision map learns them (``train/patch_class``, as in
            :class:`trp.recipes.ReferringModule`): dense supervision that teaches a
            from-scratch ViT every shape of the scene, which answering that a queried class is
            absent needs. Not part of the model (checkpoints hold the VLM only).
    """

    def __init__(
        self,
        *,
        model: TRPForConditionalGeneration,
        optim: Mapping[str, Any],
        loss: Mapping[str, Any],
        eval: Mapping[str, Any],
        num_prompt_tokens: int = 4,
        keep_overlays: int = 8,
        num_patch_classes: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = complete(OptimConfig, optim, "optim")
        self.loss_cfg = complete(LossConfig, loss, "loss")
        self.eval_cfg = complete(EvalConfig, eval, "eval")
        self.lr_schedule: WarmupCosine | None = None
        self.keep_overlays = int(keep_overlays)
        width = int(model.text_weight.shape[1])
        vision_dim = int(model.vlm.vision_dim)
        self.prompt_encoder = VisualPromptEncoder(
            in_dim=vision_dim,
            out_dim=width,
            num_tokens=int(num_prompt_tokens),
            num_heads=next(h for h in (4, 3, 2, 1) if width % h == 0),
        )
        self.vpt_id = int(model.tokenizer.convert_tokens_to_ids(VPT))
        self.criterion = _criteria(list(model.heads.keys()), self.loss_cfg)
        self.patch_probe = patch_probe(vision_dim, int(num_patch_classes), self.loss_cfg)
        self.evaluator = UnifiedEvaluator(oks_sigmas=KEYPOINT_OKS_SIGMAS)
        self.metrics: dict[str, float] = {}
        self.overlays: list[Any] = []
        self.predictions: list[dict[str, Any]] = []
        self._train_threads = torch.get_num_threads()

    def _prompts(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        return visual_prompts(
            self.model,
            self.prompt_encoder,
            batch["prompt_masks"],
            batch["prompt_sample"],
            vpt_id=self.vpt_id,
        )

    # ------------------------------------------------------------------ training
    def forward_batch(self, batch: dict[str, Any]) -> TRPOutput:
        with self._prompts(batch):
            return self.model(
                batch["pixel_values"],
                batch["input_ids"],
                batch["attention_mask"],
                batch["parses"],
                **batch["image_inputs"],
            )

    def losses(self, out: TRPOutput, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Token loss + every routed unit's criterion (units with nothing routed skipped)."""
        token = self.model.token_loss(out, batch["labels"], batch["objects"])
        losses = {"token": token * float(self.loss_cfg["token"])}
        targets = batch["targets"]
        routed = {u: rp for u, rp in out.predictions.items() if len(rp)}
        missing = [u for u in routed if u not in targets]
        if missing:
            raise ValueError(f"the batch routes targets to {missing} but has no targets for them")
        losses.update(self.criterion(routed, targets))
        if self.patch_probe is not None and "patch_classes" in batch:
            losses["patch_class"] = patch_class_loss(
                self.patch_probe,
                out.images.maps[0],
                batch["patch_classes"],
                weight=float(self.loss_cfg["patch_class"]),
                foreground=float(self.loss_cfg["patch_class_foreground"]),
            )
        # Keep every parameter in the graph: a head with nothing to decode this step still
        # gets a (zero) gradient, so DDP's reducer and the optimizer see the same parameters.
        anchor = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        losses["token"] = losses["token"] + anchor
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.forward_batch(batch)
        losses = self.losses(out, batch)
        total = sum(losses.values())
        bs = batch["images"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
        return total

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Generate and decode: one prediction dict per sample (``text``, ``boxes`` xyxy
        pixels, ``scores``, ``labels``, ``masks`` bool, ``keypoints`` pixels, ``depth``)."""
        with self._prompts(batch):
            gen = self.model.generate(
                batch["pixel_values"],
                batch["input_ids"],
                batch["attention_mask"],
                image_inputs=batch["image_inputs"],
                max_new_tokens=int(self.eval_cfg["max_new_tokens"]),
                constrained=bool(self.eval_cfg["constrained"]),
            )
        b = batch["images"].shape[0]
        h, w = (int(v) for v in batch["images"].shape[-2:])  # predictions in image pixels
        preds: list[dict[str, Any]] = []
        for i in range(b):
            parse = gen.parses[i]
            preds.append(
                {
                    "text": gen.texts[i] if parse is None else _plain_text(parse),
                    "answer": gen.texts[i],
                    "parsed": parse is not None,
                }
            )
        scale = torch.tensor([w, h, w, h])
        for unit, rp in gen.predictions.items():
            if not len(rp):
                continue
            p = rp.predictions
            labels = torch.tensor([_label(c) for c in rp.concepts])
            if unit == "box":
                values = box_cxcywh_to_xyxy(p["boxes"].float().cpu()).clamp(0, 1) * scale
                scores = p["scores"].float().sigmoid().cpu().reshape(-1)
            elif unit == "mask":
                logits = F.interpolate(
                    p["masks"].float()[:, None], size=(h, w), mode="bilinear", align_corners=False
                )[:, 0]
                values = logits.cpu().sigmoid() > float(self.eval_cfg["mask_threshold"])
                scores = torch.ones(len(rp))
            elif unit == "keypoint":
                xy = p["keypoints"].float().cpu() * torch.tensor([w, h])
                vis = p["visibility"].float().cpu().sigmoid()
                values = torch.cat([xy, (vis > 0.5).float()[..., None] * 2], dim=-1)
                scores = vis.mean(-1)
            else:
                values = DepthHead.postprocess(p, (h, w)).float().cpu()
                scores = torch.ones(len(rp))
            key = {"box": "boxes", "mask": "masks", "keypoint": "keypoints", "depth": "depth"}
            for s in sorted(set(rp.sample.tolist())):
                rows = (rp.sample == s).nonzero().flatten().cpu()
                d = preds[s]
                d[key[unit]] = values[rows] if unit != "depth" else values[rows[0]]
                if unit != "depth":
                    d.setdefault("unit_scores", {})[unit] = scores[rows]
                    d.setdefault("unit_labels", {})[unit] = labels[rows]
        return preds

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        preds = self.predict_batch(batch)
        samples = batch["samples"]
        for i, p in enumerate(preds):
            task = samples["task"][i]
            sample = {k: v[i] for k, v in samples.items()}
            self.evaluator.update(task, _evaluation_prediction(task, p), _target(task, sample))
            self.predictions.append(
                {
                    "index": int(sample["index"]),
                    "task": task,
                    "prompt": sample["prompt"],
                    "answer": p["answer"],
                    "target": sample["answer"],
                    "parsed": p["parsed"],
                }
            )
            if len(self.overlays) < self.keep_overlays:
                self.overlays.append(
                    (f"{task}_{int(sample['index']):04d}", draw_task_overlay(sample, p))
                )

    def on_test_epoch_start(self) -> None:
        self._train_threads = torch.get_num_threads()
        torch.set_num_threads(int(self.eval_cfg.get("threads", self._train_threads)))
        self.evaluator.reset()
        self.predictions, self.overlays = [], []

    def on_test_epoch_end(self) -> None:
        torch.set_num_threads(self._train_threads)
        self.metrics = self.evaluator.compute()
        parsed = [float(p["parsed"]) for p in self.predictions]
        self.metrics["answers/parsed"] = sum(parsed) / len(parsed) if parsed else float("nan")


def _plain_text(parse: ParseResult) -> str:
    """An answer's text with each triplet replaced by its phrase (grounded captions)."""
    out = [parse.texts[0]]
    for triplet, text in zip(parse.triplets, parse.texts[1:]):
        out += [triplet.concept, text]
    return "".join(out)


def _label(concept: str) -> int:
    """Class index of a phrase naming a shape (its last shape word; -1: none)."""
    words = concept.replace(",", " ").split()
    for word in reversed(words):
        if word in SHAPE_CLASSES:
            return SHAPE_CLASSES.index(word)
    return -1


def _instances(p: Mapping[str, Any], key: str, unit: str, empty: Tensor) -> dict[str, Tensor]:
    if key not in p:
        return {key: empty, "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    return {key: p[key], "scores": p["unit_scores"][unit], "labels": p["unit_labels"][unit]}


def _evaluation_prediction(task: str, p: Mapping[str, Any]) -> dict[str, Any] | None:
    """A :class:`UnifiedEvaluator` prediction from :meth:`UnifiedModule.predict_batch`'s dict."""
    if not p["parsed"]:
        return None
    if task == "rec":
        return {"box": p["boxes"][0]} if "boxes" in p else None
    if task == "res":
        return {"mask": p["masks"][0]} if "masks" in p else None
    if task == "depth":
        return {"depth": p["depth"]} if "depth" in p else None
    if task in ("region_caption", "text"):
        return {"text": p["text"]}
    if task == "det":
        return _instances(p, "boxes", "box", torch.zeros(0, 4))
    if task == "grounded_caption":
        return {"text": p["text"], **_instances(p, "boxes", "box", torch.zeros(0, 4))}
    if task == "seg":
        # The evaluator gives an empty detection the target's mask size.
        return _instances(p, "masks", "mask", torch.zeros(0, 0, 0, dtype=torch.bool))
    return _instances(p, "keypoints", "keypoint", torch.zeros(0, MAX_KEYPOINTS, 3))


def _target(task: str, s: Mapping[str, Any]) -> dict[str, Any]:
    """A :class:`UnifiedEvaluator` target from one unified sample."""
    if task == "rec":
        return {"box": s["boxes"][0]}
    if task == "res":
        return {"mask": s["masks"][0]}
    if task == "depth":
        return {"depth": s["depth"]}
    if task in ("region_caption", "text"):
        return {"text": s["reference"]}
    t = {"boxes": s["boxes"], "labels": s["labels"], "negative": bool(s["negative"])}
    if task == "seg":
        t["masks"] = s["masks"]
    if task == "keypoints":
        t.update(keypoints=s["keypoints"], areas=s["areas"])
    if task == "grounded_caption":
        t["text"] = s["reference"]
    return t


def write_outputs(module: UnifiedModule, output_dir: Path, extra: Mapping[str, Any]) -> dict:
    """``metrics.json`` (flat metrics + ``extra``), ``predictions.json`` and ``overlays/``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"metrics": module.metrics, "samples": len(module.predictions), **extra}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "predictions.json").write_text(json.dumps(module.predictions, indent=1) + "\n")
    overlay_dir = output_dir / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    paths = []
    for name, image in module.overlays:
        path = overlay_dir / f"{name}.png"
        image.save(path)
        paths.append(str(path))
    summary["overlays"] = paths
    return summary


def task_table(metrics: Mapping[str, float]) -> str:
    """One line per task family: its metrics, ``name=value`` (NaN: no sample of that task)."""
    families: dict[str, list[str]] = {}
    for key, value in metrics.items():
        family, _, name = key.partition("/")
        families.setdefault(family, []).append(f"{name}={value:.3f}")
    width = max((len(f) for f in families), default=4)
    return "\n".join(f"{f:<{width}}  {'  '.join(v)}" for f, v in families.items())


class UnifiedDataModule(ReferringDataModule):
    """:class:`ReferringDataModule` whose batches also move their per-unit targets and prompt
    masks to the device (the parses and the collated samples stay on the host)."""

    def transfer_batch_to_device(
        self, batch: dict, device: torch.device, dataloader_idx: int
    ) -> dict:
        out = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if "targets" in out:
            out["targets"] = {
                u: {k: v.to(device) for k, v in t.items()} for u, t in out["targets"].items()
            }
        return out


def _datasets(
    cfg: Any, patch_size: int, *, with_train: bool = True
) -> tuple[UnifiedShapesDataset | None, UnifiedShapesDataset]:
    """The training (None without ``with_train``) and held-out scenes; ``patch_size``: pixels
    per VRT patch of the host."""
    data = cfg.data
    if data.name != "shapes_unified":
        raise ValueError(f"recipe shapes_unified needs data=shapes_unified, got {data.name!r}")
    kwargs = {
        "image_size": int(cfg.model.image_size),
        "patch_size": int(patch_size),
        "mixture": dict(data.mixture),
        "targets": dict(data.targets) or "ref",
        "num_vrt": int(data.num_vrt),
        "min_shapes": int(data.min_shapes),
        "max_shapes": int(data.max_shapes),
        "empty_image_prob": float(data.empty_image_prob),
        "negative_prob": float(data.negative_prob),
        "max_query_classes": int(data.max_query_classes),
    }
    train = (
        UnifiedShapesDataset(num_samples=int(data.train_size), seed=int(data.seed), **kwargs)
        if with_train
        else None
    )
    per_task = bool(data.eval_per_task)
    tasks = sum(1 for w in data.mixture.values() if float(w) > 0) if per_task else 1
    held_out = UnifiedShapesDataset(
        num_samples=int(data.eval_size) * tasks,
        seed=int(data.eval_seed),
        balanced=per_task,
        **kwargs,
    )
    return train, held_out


def _patch_size(cfg: Any, model: TRPForConditionalGeneration) -> int:
    """Pixels per VRT patch: the reference VLM's ``patch_size``, or what the HF processor's
    token grid makes of ``model.image_size`` (square, dividing the image)."""
    if model.processor is None:
        return int(cfg.model.patch_size)
    from trp.models.hf_conversation import token_grid

    size = int(cfg.model.image_size)
    grid = token_grid(model.processor, (size, size))
    if grid[0] != grid[1] or size % grid[0]:
        raise ValueError(
            f"model.image_size={size} gives a {grid} token grid; shapes_unified needs a "
            "square grid that divides the image (pick a multiple of the VLM's patch size)"
        )
    return size // grid[0]


def _parts(
    cfg: Any,
    model: TRPForConditionalGeneration,
    train_set: UnifiedShapesDataset,
    held_out: UnifiedShapesDataset,
) -> tuple[UnifiedModule, UnifiedDataModule]:
    from omegaconf import OmegaConf

    k = int(cfg.data.prompt_tokens)
    module = UnifiedModule(
        model=model,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        eval=OmegaConf.to_container(cfg.eval, resolve=True),
        num_prompt_tokens=k,
        keep_overlays=int(cfg.eval.num_overlays),
        num_patch_classes=len(SHAPE_CLASSES) + 1,
    )
    common: dict[str, Any] = {
        "grid": held_out.grid,
        "image_size": (held_out.height, held_out.width),
        "num_prompt_tokens": k,
        "prompt_first": bool(cfg.recipe.prompt_first),
    }
    if model.processor is not None:
        collator: type[UnifiedCollator] = HFUnifiedCollator
        common["processor"] = model.processor
    else:
        collator = UnifiedCollator
        common["tokenizer"] = model.tokenizer
    datamodule = UnifiedDataModule(
        train=train_set,
        held_out=held_out,
        train_collate=collator(**common, with_answers=True),
        eval_collate=collator(**common, with_answers=False),
        batch_size=int(cfg.data.batch_size),
        eval_batch_size=int(cfg.eval.batch_size),
        num_workers=int(cfg.data.num_workers),
    )
    return module, datamodule


def _test_and_write(
    trainer: L.Trainer,
    module: UnifiedModule,
    datamodule: UnifiedDataModule,
    output_dir: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from trp.recipes.run import format_training

    trainer.test(module, datamodule=datamodule, verbose=False)
    summary = dict(extra, metrics=module.metrics)
    if trainer.is_global_zero:
        summary = write_outputs(module, output_dir, extra)
        if "seconds_per_step" in extra:
            print("\n" + format_training(extra))
        print(task_table(module.metrics))
        print(f"\nmetrics: {output_dir / 'metrics.json'}")
    return summary


def train_unified(cfg: Any) -> dict[str, Any]:
    """Train ``recipe=shapes_unified`` (a composed config), save, evaluate every task.

    Writes ``checkpoint/`` (the model as :func:`trp.recipes.save_checkpoint` does, plus
    ``prompt_encoder.safetensors``), ``metrics.json`` (the flat per-task metrics),
    ``predictions.json`` and ``overlays/``; prints the per-task table. Returns the summary.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from trp.models.build import build_hf_model, build_model, build_tokenizer
    from trp.recipes.checkpoint import save_checkpoint
    from trp.recipes.run import _setup, _trainer, training_facts

    _setup(cfg)
    output_dir = Path(cfg.output_dir)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if "pretrained_dir" in cfg.model:  # model=hf_vlm: the processor makes prompts and grid
        model = build_hf_model(model_cfg)
        train_set, held_out = _datasets(cfg, _patch_size(cfg, model))
    else:
        train_set, held_out = _datasets(cfg, int(cfg.model.patch_size))
        tok_cfg = cfg.model.tokenizer
        texts = (
            None
            if tok_cfg.dir
            else unified_corpus(train_set, num_samples=int(tok_cfg.corpus_samples))
        )
        model = build_model(model_cfg, tokenizer=build_tokenizer(tok_cfg, texts))
    module, datamodule = _parts(cfg, model, train_set, held_out)
    trainer = _trainer(cfg, output_dir, budget=True)
    start = time.monotonic()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.monotonic() - start
    checkpoint = output_dir / "checkpoint"
    if trainer.is_global_zero:
        save_checkpoint(model, cfg, checkpoint)
        save_model(module.prompt_encoder, str(checkpoint / PROMPT_ENCODER_FILE))
    extra = {
        "recipe": str(cfg.recipe.name),
        **training_facts(trainer, seconds),
        "checkpoint": str(checkpoint),
    }
    return _test_and_write(trainer, module, datamodule, output_dir, extra)


def evaluate_unified(
    model: TRPForConditionalGeneration, cfg: Any, checkpoint: str | Path
) -> dict[str, Any]:
    """Evaluate every task of a ``shapes_unified`` checkpoint (``model`` loaded from it; ``cfg``
    with the checkpoint's model, recipe and data sections): the visual-prompt encoder comes
    from its ``prompt_encoder.safetensors``. Writes what :func:`train_unified` writes after
    training to ``cfg.output_dir``; returns the summary."""
    from safetensors.torch import load_model

    from trp.recipes.run import _setup, _trainer

    path = Path(checkpoint) / PROMPT_ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a shapes_unified checkpoint keeps its prompt encoder")
    _setup(cfg)
    _, held_out = _datasets(cfg, _patch_size(cfg, model), with_train=False)
    module, datamodule = _parts(cfg, model, held_out, held_out)
    load_model(module.prompt_encoder, str(path))
    trainer = _trainer(cfg, Path(cfg.output_dir), logger=False)
    extra = {"recipe": str(cfg.recipe.name), "checkpoint": str(checkpoint)}
    return _test_and_write(trainer, module, datamodule, Path(cfg.output_dir), extra)
