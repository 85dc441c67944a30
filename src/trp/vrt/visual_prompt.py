"""Visual-prompt encoder: a region of the image (point, box, scribble, mask) becomes K tokens.

REF-VLM feeds a visual prompt as a binary mask, pools the vision features under it and splices
the result into the LM input at the ``[VPT]`` placeholder. Three steps, each usable alone:

1. :func:`prompt_masks`: every prompt kind (:class:`trp.grammar.VisualPrompt` or a bool mask)
   becomes a bool ``[H, W]`` mask at the image size;
2. :func:`prompt_coverage`: the fraction of each feature cell the mask covers, on the grid of
   *its own image* ``(h_i, w_i)`` — height first. REF-VLM resizes the mask to ``(w, h)``, which
   is wrong on every non-square image; adaptive pooling with ``(h, w)`` keeps the aspect;
3. :class:`VisualPromptEncoder`: K learned queries attend to the covered cells (attention
   logits biased by ``log(coverage)``, uncovered and padded cells excluded), seeded with the
   masked average of the features, and projected to the LM width;

then :func:`splice_prompt_tokens` writes the ``[N, K, D]`` tokens into ``inputs_embeds`` at the
``[VPT]`` positions of ``input_ids`` (a prompt occupies K consecutive placeholders:
:func:`expand_vpt` writes them into the text).

Feature maps come as ``[B, C, h, w]`` (the reference VLM's ``ImageEncoding.maps``) or as flat
patch features of an HF VLM through :meth:`VisualPromptEncoder.forward_flat` and
:meth:`trp.vrt.ImageBinding.feature_maps` (images of different grids padded, padding ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.grammar import VPT, VisualPrompt
from trp.vrt.binding import ImageBinding

__all__ = [
    "VisualPromptEncoder",
    "expand_vpt",
    "prompt_coverage",
    "prompt_masks",
    "splice_prompt_tokens",
]


def prompt_masks(
    prompts: Sequence[VisualPrompt | Tensor], image_size: Sequence[int], *, radius: int = 2
) -> Tensor:
    """Bool ``[N, H, W]`` masks of ``prompts`` on an ``(H, W)`` image.

    A :class:`~trp.grammar.VisualPrompt` is rasterised (points and scribbles as discs of
    ``radius`` pixels, boxes filled); a tensor must already be an ``[H, W]`` mask. Every mask
    must cover at least one pixel: an empty prompt points nowhere.
    """
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive sizes, got {image_size}")
    h, w = int(image_size[0]), int(image_size[1])
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, VisualPrompt):
            m = p.to_mask(h, w, radius=radius)
        elif isinstance(p, Tensor):
            if p.shape != (h, w):
                raise ValueError(f"prompt {i}: mask shape {tuple(p.shape)} != image {(h, w)}")
            if p.is_floating_point():
                raise TypeError(f"prompt {i}: masks must be bool or integer, threshold first")
            m = p != 0
        else:
            raise TypeError(f"prompt {i}: expected VisualPrompt or Tensor, got {type(p).__name__}")
        if not bool(m.any()):
            raise ValueError(f"prompt {i} covers no pixel of the {h}x{w} image")
        out.append(m.to(torch.bool))
    if not out:
        return torch.zeros(0, h, w, dtype=torch.bool)
    return torch.stack(out)


def prompt_coverage(masks: Tensor, grid: Sequence[int]) -> Tensor:
    """Fraction of each cell of an ``(h, w)`` feature grid covered by each mask.

    ``masks`` bool ``[N, H, W]`` at image resolution -> float32 ``[N, h, w]``. Cells are
    adaptive-pooling bins (exact when ``H``/``W`` are multiples of ``h``/``w``); the grid is
    height first, so a non-square image keeps its aspect. A prompt smaller than every cell it
    touches still covers them partly, never nothing.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError("masks must be a Tensor[N, H, W]")
    if masks.is_floating_point():
        raise TypeError("masks must be bool or integer")
    if len(grid) != 2 or min(int(g) for g in grid) < 1:
        raise ValueError(f"grid must be (h, w) with positive sizes, got {grid}")
    gh, gw = int(grid[0]), int(grid[1])
    if masks.shape[1] < gh or masks.shape[2] < gw:
        raise ValueError(f"masks {tuple(masks.shape[1:])} are smaller than the grid {(gh, gw)}")
    if masks.shape[0] == 0:
        return masks.new_zeros((0, gh, gw), dtype=torch.float32)
    return F.adaptive_avg_pool2d((masks != 0).float()[:, None], (gh, gw))[:, 0]


class VisualPromptEncoder(nn.Module):
    """Pools the features under each prompt mask into ``num_tokens`` tokens of width ``out_dim``.

    Args:
        in_dim: channels ``C`` of the feature maps.
        out_dim: the LM's hidden size ``D``.
        num_tokens: tokens ``K`` per prompt (the ``[VPT]`` placeholders it fills).
        num_heads: attention heads of the query-to-cell attention (divides ``out_dim``).
        dropout: attention dropout.

    ``forward(features, masks, image_index=None, padding=None) -> Tensor[N, K, D]``.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        num_tokens: int = 4,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("num_tokens", num_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_heads < 1 or out_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide out_dim ({out_dim})")
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        self.key = nn.Linear(in_dim, out_dim)
        self.value = nn.Linear(in_dim, out_dim)
        self.seed = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_tokens, out_dim) * 0.02)
        self.attn = nn.MultiheadAttention(out_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(out_dim, 4 * out_dim), nn.GELU(), nn.Linear(4 * out_dim, out_dim)
        )
        self.norm2 = nn.LayerNorm(out_dim)

    def forward(
        self,
        features: Tensor,
        masks: Tensor | Sequence[Tensor],
        image_index: Tensor | None = None,
        padding: Tensor | None = None,
    ) -> Tensor:
        """Encode ``N`` prompts.

        Args:
            features: ``Tensor[B, C, h, w]`` feature maps (``h x w`` = the padded grid).
            masks: bool ``[N, H, W]`` prompt masks at the image size, or a sequence of ``N``
                bool ``[H_i, W_i]`` masks when images differ in size; each image spans the
                *unpadded* cells of its map (``padding`` False there).
            image_index: ``Tensor[N]`` long, the image of each prompt (default ``arange(N)``,
                one prompt per image).
            padding: bool ``[B, h, w]``, True at cells outside the image (HF VLMs' batches of
                different grids, :meth:`ImageBinding.feature_maps`); default none.

        Returns:
            ``Tensor[N, K, D]`` prompt tokens (``features``' dtype).
        """
        if not isinstance(features, Tensor) or features.dim() != 4:
            raise ValueError("features must be a Tensor[B, C, h, w]")
        b, c, gh, gw = features.shape
        if c != self.in_dim:
            raise ValueError(f"features have {c} channels, the encoder expects {self.in_dim}")
        if isinstance(masks, Tensor):
            if masks.dim() != 3:
                raise ValueError("masks must be a bool Tensor[N, H, W] or a list of [H, W]")
            masks = list(masks)
        masks = [m.to(features.device) for m in masks]
        if any(not isinstance(m, Tensor) or m.dim() != 2 for m in masks):
            raise ValueError("masks must be a bool Tensor[N, H, W] or a list of [H, W]")
        n = len(masks)
        if image_index is None:
            if n > b:
                raise ValueError(f"{n} prompts for {b} images: pass image_index")
            image_index = torch.arange(n, device=features.device)
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=features.device)
        if image_index.shape != (n,):
            raise ValueError(f"image_index must have shape [{n}], got {tuple(image_index.shape)}")
        if n and (int(image_index.min()) < 0 or int(image_index.max()) >= b):
            raise ValueError(f"image_index must lie in [0, {b})")
        if padding is not None and padding.shape != (b, gh, gw):
            raise ValueError(f"padding must have shape {(b, gh, gw)}, got {tuple(padding.shape)}")
        if n == 0:
            return features.new_zeros(0, self.num_tokens, self.out_dim)
        cover = self._coverage(masks, image_index, padding, (gh, gw))
        if bool((cover.flatten(1).sum(1) <= 0).any()):
            raise ValueError("a prompt mask is empty (it covers no feature cell)")
        cells = features[image_index].flatten(2).transpose(1, 2)  # N x hw x C
        weight = cover.flatten(1).to(cells.dtype)  # N x hw
        pooled = (weight[..., None] * cells).sum(1) / weight.sum(1, keepdim=True)  # N x C
        # log(coverage) as an additive bias: cells the prompt covers partly count less, cells it
        # misses (and padding) get -inf and are never read.
        bias = torch.log(weight.float().clamp(min=0)).to(cells.dtype)  # N x hw
        heads = self.attn.num_heads
        attn_mask = bias[:, None, :].expand(n, self.num_tokens, -1).repeat_interleave(heads, 0)
        query = self.queries[None].to(cells.dtype) + self.seed(pooled)[:, None]  # N x K x D
        out, _ = self.attn(
            query, self.key(cells), self.value(cells), attn_mask=attn_mask, need_weights=False
        )
        x = self.norm1(query + out)
        return self.norm2(x + self.mlp(x))

    def _coverage(
        self,
        masks: list[Tensor],
        image_index: Tensor,
        padding: Tensor | None,
        grid: tuple[int, int],
    ) -> Tensor:
        """``[N, h, w]`` coverage of each mask on the valid cells of its image's map."""
        out = torch.zeros((len(masks), *grid), dtype=torch.float32, device=image_index.device)
        valid = None if padding is None else ~padding
        for i, img in enumerate(image_index.tolist()):
            hi, wi = grid
            if valid is not None:
                # The image spans the top-left valid block of its map (bottom/right padding).
                hi, wi = int(valid[img].any(1).sum()), int(valid[img].any(0).sum())
            out[i, :hi, :wi] = prompt_coverage(masks[i][None], (hi, wi))[0]
        return out

    def forward_flat(
        self,
        features: Tensor,
        binding: ImageBinding,
        masks: Tensor | Sequence[Tensor],
        image_index: Tensor,
    ) -> Tensor:
        """Encode prompts on flat patch features ``[ΣP, C]`` of an HF VLM (binding order); each
        image's grid comes from ``binding`` (:meth:`ImageBinding.feature_maps`)."""
        maps, padding = binding.feature_maps(features)
        return self.forward(maps, masks, image_index, padding)


def expand_vpt(text: str, num_tokens: int) -> str:
    """``text`` with each ``[VPT]`` repeated ``num_tokens`` times (one placeholder per token)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return text.replace(VPT, VPT * num_tokens)


def splice_prompt_tokens(
    inputs_embeds: Tensor,
    input_ids: Tensor,
    prompt_tokens: Tensor,
    *,
    vpt_id: int,
    prompt_sample: Tensor | None = None,
) -> Tensor:
    """``inputs_embeds`` with the rows at ``[VPT]`` tokens replaced by the prompts' tokens.

    Args:
        inputs_embeds: ``Tensor[B, L, D]``.
        input_ids: ``Tensor[B, L]``; prompt ``j`` of a row fills its ``j``-th run of K
            placeholders (row-major, as :func:`expand_vpt` writes them).
        prompt_tokens: ``Tensor[N, K, D]`` from :class:`VisualPromptEncoder`.
        vpt_id: the ``[VPT]`` token id.
        prompt_sample: ``Tensor[N]`` long, the row of each prompt, non-decreasing (default: the
            prompts fill the placeholders in row-major order).

    Returns:
        A new ``Tensor[B, L, D]`` (differentiable in both ``inputs_embeds`` and the tokens).

    Raises:
        ValueError: the number of placeholders (in total, or in a row) is not K times the
            number of prompts there.
    """
    if inputs_embeds.dim() != 3 or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError("inputs_embeds must be [B, L, D] and input_ids [B, L]")
    if prompt_tokens.dim() != 3 or prompt_tokens.shape[2] != inputs_embeds.shape[2]:
        raise ValueError(
            f"prompt_tokens must be [N, K, {inputs_embeds.shape[2]}], got "
            f"{tuple(prompt_tokens.shape)}"
        )
    n, k, d = prompt_tokens.shape
    is_vpt = input_ids == vpt_id  # B x L
    total = int(is_vpt.sum())
    if total != n * k:
        raise ValueError(
            f"input_ids hold {total} [VPT] tokens for {n} prompts of {k} tokens ({n * k})"
        )
    if prompt_sample is not None:
        prompt_sample = torch.as_tensor(prompt_sample, dtype=torch.long, device=input_ids.device)
        if prompt_sample.shape != (n,) or bool((prompt_sample.diff() < 0).any()):
            raise ValueError(f"prompt_sample must be a non-decreasing Tensor[{n}]")
        per_row = torch.bincount(prompt_sample, minlength=input_ids.shape[0]) * k
        if per_row.numel() != input_ids.shape[0] or not torch.equal(per_row, is_vpt.sum(1)):
            raise ValueError(
                f"[VPT] tokens per row {is_vpt.sum(1).tolist()} != {k} x prompts per row "
                f"{(per_row // k).tolist()}"
            )
    out = inputs_embeds.clone()
    out[is_vpt] = prompt_tokens.reshape(n * k, d).to(out.dtype)
    return out
