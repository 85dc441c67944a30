"""The reference VLM as a Hugging Face model: a timm ViT + a Qwen2 causal LM, LLaVA-style.

:class:`ReferenceVLMForConditionalGeneration` is a ``PreTrainedModel`` with ``GenerationMixin``,
so it runs through the same path as any host VLM: :class:`trp.vrt.VRTCausalLM` wraps its
embeddings, ``generate`` is transformers' own, ``save_pretrained`` / ``from_pretrained`` write
and read safetensors plus ``config.json``.

Data flow (one image per sample, ``N = h * w`` patches)::

    pixel_values [B, 3, H, W] -> ConvStem (stride 4, optional) -> timm ViT -> map [B, C_v, h, w]
        -> FeatureAdapter (to the LM width D, + 2-D sine positions) -> patch tokens [B, N, D]
    input_ids with N <image> placeholders per sample -> embeddings; the placeholders take the
        patch tokens -> Qwen2 backbone -> lm_head

:meth:`encode_images` returns everything the heads need from the images (an
:class:`~trp.models.ImageEncoding`: the patch tokens, the vision map, the stride-4 stem map),
computed once per step; ``forward`` / ``generate`` take its tokens as ``image_embeds`` so the
vision tower never runs twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from einops import rearrange
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, Qwen2Config
from transformers.modeling_outputs import CausalLMOutputWithPast

from trp.heads import FeatureAdapter
from trp.models.fine_stem import STEM_KINDS, ConvStem, StemDownsample
from trp.models.image_encoding import ImageEncoding

__all__ = [
    "IMAGE_ATTENTION",
    "ReferenceVLMConfig",
    "ReferenceVLMForConditionalGeneration",
    "build_vision_encoder",
]

#: The patch tokens' attention among themselves (:class:`ReferenceVLMConfig`).
IMAGE_ATTENTION = ("causal", "bidirectional")

_VISION_KEYS = (
    "name",
    "embed_dim",
    "depth",
    "num_heads",
    "conv_stem",
    "stem_downsample",
    "fused_attn",
)


class ReferenceVLMConfig(PretrainedConfig):
    """Config of :class:`ReferenceVLMForConditionalGeneration`.

    Args:
        vision: timm ViT settings: ``name`` (architecture), ``embed_dim``, ``depth``,
            ``num_heads``, ``conv_stem`` (the ViT embeds the :class:`ConvStem` map instead of
            raw pixels), ``stem_downsample`` (stride-2 conv blocks after the stem, with
            ``conv_stem``), ``fused_attn`` (scaled-dot-product attention kernels).
        text_config: a :class:`transformers.Qwen2Config` (or its dict).
        image_size, patch_size: square input size and ViT patch size in pixels.
        fine_channels: width of the stride-4 :class:`ConvStem` (0: none).
        fine_stem: its form, ``patchify`` or ``strided`` (:data:`trp.models.STEM_KINDS`); the
            default is ``strided``, the form of the configs saved before the key existed (the
            recipes' ``model.fine_stem`` defaults to ``patchify``).
        image_token_id: id of the ``<image>`` placeholder.
        text_attn_implementation: the LM's attention kernel (``eager`` / ``sdpa``), kept in the
            saved config so a reloaded model runs the same kernel (and numbers) as the trained
            one.
        image_attention: how the LM's patch tokens attend to each other: ``causal`` (raster
            order, LLaVA's form and the default of configs saved before the key) or
            ``bidirectional`` (every patch of an image attends to all of its patches, PaliGemma's
            prefix form; transformers' ``block_sequence_ids`` mask). Text stays causal.
    """

    model_type = "trp_reference_vlm"

    def __init__(
        self,
        vision: Mapping[str, Any] | None = None,
        text_config: Qwen2Config | Mapping[str, Any] | None = None,
        image_size: int = 128,
        patch_size: int = 16,
        fine_channels: int = 0,
        fine_stem: str = "strided",
        image_token_id: int | None = None,
        text_attn_implementation: str | None = None,
        image_attention: str = "causal",
        **kwargs: Any,
    ) -> None:
        vision = dict(
            vision or {"name": "vit_tiny_patch16_224", "embed_dim": 192, "depth": 4, "num_heads": 3}
        )
        unknown = sorted(set(vision) - set(_VISION_KEYS))
        if unknown:
            raise ValueError(f"vision config: unknown keys {unknown}; known: {list(_VISION_KEYS)}")
        self.vision = vision
        if text_config is None:
            text_config = Qwen2Config()
        elif isinstance(text_config, Mapping):
            text_config = Qwen2Config(**text_config)
        self.text_config = text_config
        attn = text_attn_implementation or text_config._attn_implementation or "sdpa"
        if attn not in ("eager", "sdpa"):
            raise ValueError(f"text_attn_implementation must be eager or sdpa, got {attn!r}")
        self.text_attn_implementation = attn
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.fine_channels = int(fine_channels)
        if fine_stem not in STEM_KINDS:
            raise ValueError(f"fine_stem must be one of {STEM_KINDS}, got {fine_stem!r}")
        self.fine_stem = fine_stem
        self.image_token_id = image_token_id
        if image_attention not in IMAGE_ATTENTION:
            raise ValueError(
                f"image_attention must be one of {IMAGE_ATTENTION}, got {image_attention!r}"
            )
        if image_attention == "bidirectional" and getattr(text_config, "use_sliding_window", False):
            raise ValueError("image_attention=bidirectional needs an LM without sliding windows")
        self.image_attention = image_attention
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={image_size} must be divisible by patch_size={patch_size}"
            )
        if self.fine_channels < 0:
            raise ValueError(f"fine_channels must be >= 0, got {fine_channels}")
        if vision.get("conv_stem") and not self.fine_channels:
            raise ValueError("vision.conv_stem needs a stem: set fine_channels > 0")
        down = int(vision.get("stem_downsample") or 0)
        if down < 0 or (down and not vision.get("conv_stem")):
            raise ValueError(
                f"vision.stem_downsample must be >= 0 and needs vision.conv_stem, got {down}"
            )
        kwargs.setdefault("tie_word_embeddings", bool(text_config.tie_word_embeddings))
        super().__init__(**kwargs)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out


def build_vision_encoder(
    vision: Mapping[str, Any],
    *,
    image_size: int,
    patch_size: int,
    in_chans: int = 3,
    input_stride: int = 1,
) -> nn.Module:
    """A timm ViT without classifier (``pretrained=False``: nothing is downloaded).

    With ``input_stride > 1`` the ViT reads a stride-``input_stride`` feature map of
    ``in_chans`` channels (a convolutional stem's output) instead of pixels: its patch
    embedding is a ``patch_size / input_stride`` convolution on that map, one token per
    ``patch_size`` pixels ("Early Convolutions Help Transformers See Better", Xiao et al. 2021).
    ``vision.fused_attn`` goes through ``timm.layers.set_fused_attn`` (restored afterwards).
    """
    import timm
    from timm.layers import set_fused_attn, use_fused_attn

    if patch_size % input_stride or image_size % input_stride:
        raise ValueError(
            f"patch_size={patch_size} and image_size={image_size} must be divisible by the "
            f"stem stride {input_stride}"
        )
    previous = use_fused_attn()
    # On a CPU with short sequences the plain matmul-softmax attention's backward is faster.
    set_fused_attn(bool(vision.get("fused_attn", True)))
    try:
        return timm.create_model(
            str(vision["name"]),
            pretrained=False,
            img_size=image_size // input_stride,
            patch_size=patch_size // input_stride,
            in_chans=in_chans,
            embed_dim=int(vision["embed_dim"]),
            depth=int(vision["depth"]),
            num_heads=int(vision["num_heads"]),
            num_classes=0,
        )
    finally:
        set_fused_attn(previous)


class ReferenceVLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """The reference VLM (see the module docstring); built from a :class:`ReferenceVLMConfig`
    with random weights, or loaded with ``from_pretrained``."""

    config_class = ReferenceVLMConfig
    base_model_prefix = "reference_vlm"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _tied_weights_keys = {"language.lm_head.weight": "language.model.embed_tokens.weight"}

    def __init__(self, config: ReferenceVLMConfig) -> None:
        super().__init__(config)
        if config.image_token_id is None:
            raise ValueError("ReferenceVLMConfig.image_token_id is not set (the <image> id)")
        from transformers import Qwen2ForCausalLM

        vision = config.vision
        self.fine_stem = (
            ConvStem(config.fine_channels, kind=config.fine_stem) if config.fine_channels else None
        )
        self.vit_stem: nn.Module | None = None
        if vision.get("conv_stem"):
            down = int(vision.get("stem_downsample") or 0)
            self.vit_stem = StemDownsample(self.fine_stem, down) if down else None
            stride = self.vit_stem.stride if self.vit_stem is not None else ConvStem.stride
            width = (
                self.vit_stem.num_features if self.vit_stem is not None else config.fine_channels
            )
            self.vision = build_vision_encoder(
                vision,
                image_size=config.image_size,
                patch_size=config.patch_size,
                in_chans=width,
                input_stride=stride,
            )
        else:
            self.vision = build_vision_encoder(
                vision, image_size=config.image_size, patch_size=config.patch_size
            )
        self.vision_dim = int(vision["embed_dim"])
        config.text_config._attn_implementation = config.text_attn_implementation
        self.language = Qwen2ForCausalLM(config.text_config)
        self.adapter = FeatureAdapter(
            in_channels=[self.vision_dim], d_model=int(config.text_config.hidden_size)
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # timm and Qwen2 initialise their own modules when they are built; from_pretrained
        # loads every weight, so there is nothing left to initialise here.
        return

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language.model

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    @property
    def num_patches(self) -> int:
        h, w = self.config.grid
        return h * w

    # ------------------------------------------------------------------ image side
    def encode_images(self, pixel_values: Tensor) -> ImageEncoding:
        """``pixel_values [B, 3, H, W]`` -> :class:`ImageEncoding` (the stem runs once: its map
        is both the ViT's input, with ``conv_stem``, and the heads' fine features)."""
        size = self.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != size:
            raise ValueError(
                f"pixel_values must be [B, 3, {size[0]}, {size[1]}], got {list(pixel_values.shape)}"
            )
        fine = self.fine_stem(pixel_values) if self.fine_stem is not None else None
        if self.config.vision.get("conv_stem"):
            vit_in = self.vit_stem.blocks(fine) if self.vit_stem is not None else fine
        else:
            vit_in = pixel_values
        tokens = self.vision.forward_features(vit_in)[:, self.vision.num_prefix_tokens :]
        h, w = self.config.grid
        if tokens.shape[1] != h * w:
            raise ValueError(f"the vision encoder gave {tokens.shape[1]} patches, grid {h}x{w}")
        fmap = rearrange(tokens, "b (h w) c -> b c h w", h=h)  # B x C_v x h x w
        adapted = self.adapter([fmap])
        patches = adapted.flat + adapted.flat_pos  # B x N x D
        return ImageEncoding(
            flat_tokens=patches.flatten(0, 1),
            grids=((h, w),) * fmap.shape[0],
            maps=(fmap,),
            image_size=self.image_size,
            fine=fine,
            host_inputs={"image_embeds": patches},
        )

    def language_states(
        self, input_ids: Tensor, attention_mask: Tensor, images: ImageEncoding
    ) -> Tensor:
        """The decoder's last hidden states ``[B, L, D]`` over full conversations (teacher
        forcing), with the ``<image>`` placeholders filled from ``images``."""
        embeds = self.embed_inputs(input_ids, images.host_inputs["image_embeds"])
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = self.decoder_mask(input_ids, embeds, attention_mask, None, positions)
        return self.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).last_hidden_state

    def decoder_mask(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None,
        cache: Any,
        position_ids: Tensor | None,
    ) -> Any:
        """The attention mask the Qwen2 backbone gets: ``attention_mask`` as given (causal), or
        with ``image_attention="bidirectional"`` and the ``<image>`` placeholders in this call's
        ``input_ids`` (training, or the prompt's prefill), the backbone's per-layer-type mask
        dict whose image tokens attend to every image token of their sample. Decoding steps
        after the prompt hold no placeholders and stay causal (the cache holds the patches'
        bidirectional states)."""
        if self.config.image_attention != "bidirectional" or input_ids is None:
            return attention_mask
        is_image = input_ids == self.config.image_token_id
        if not bool(is_image.any()):
            return attention_mask
        if attention_mask is not None and (
            isinstance(attention_mask, dict) or attention_mask.dim() != 2
        ):
            raise ValueError(
                "image_attention=bidirectional builds the mask from a 2-D padding mask "
                "[B, L]; got an already prepared mask (a static cache?): use a DynamicCache"
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "image_attention=bidirectional: the <image> placeholders must be in the first "
                "forward call of a cached sequence (the prompt), not after cached tokens"
            )
        from transformers.masking_utils import create_causal_mask

        # One image per sample: block 0 is every patch of it, -1 keeps the text causal.
        blocks = is_image.long() - 1
        mask = create_causal_mask(
            config=self.language.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            block_sequence_ids=blocks,
        )
        return {"full_attention": mask}

    def embed_inputs(self, input_ids: Tensor, image_embeds: Tensor | None) -> Tensor:
        """Token embeddings ``[B, L, D]`` with the ``<image>`` placeholders replaced by
        ``image_embeds [B', N, D]`` (one image per sample that holds placeholders)."""
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id  # B x L
        if image_embeds is None or not bool(is_image.any()):
            return embeds
        counts = is_image.sum(1)
        n = self.num_patches
        if bool(((counts != 0) & (counts != n)).any()):
            raise ValueError(
                f"each prompt needs {n} <image> tokens (or none), got {counts.tolist()}"
            )
        rows = counts > 0
        # Beams / num_return_sequences expand the prompts after the images were encoded.
        per = input_ids.shape[0] // image_embeds.shape[0]
        if per * image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images for {input_ids.shape[0]} prompts")
        source = image_embeds.repeat_interleave(per, dim=0) if per > 1 else image_embeds
        return embeds.masked_scatter(is_image[..., None], source[rows].to(embeds.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. ``image_embeds`` (``ImageEncoding.tokens``) or ``pixel_values``
        fill the ``<image>`` placeholders; positions follow ``attention_mask`` (left padding)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            if image_embeds is None and pixel_values is not None:
                image_embeds = self.encode_images(pixel_values).host_inputs["image_embeds"]
            inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        if position_ids is None and attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = positions[:, -inputs_embeds.shape[1] :]
        out = self.language.model(
            inputs_embeds=inputs_embeds,
            attention_mask=self.decoder_mask(
                input_ids, inputs_embeds, attention_mask, cache, position_ids
            ),
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.get_output_embeddings()(hidden[:, keep, :])
        return CausalLMOutputWithPast(
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
