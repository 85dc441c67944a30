"""``HFVLMHost``: any Hugging Face image-text-to-text VLM as the host of a trp model.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA (and other VLMs whose base model has
``get_image_features`` and accepts ``mm_encoder_outputs``) run unmodified: the vision tower runs
once per step in :meth:`HFVLMHost.encode_images`; its output goes back into the VLM's own
``forward`` / ``generate`` as ``mm_encoder_outputs``, transformers' interface for precomputed
encoder outputs, so nothing is monkeypatched and ``generate`` is the VLM's own (its position ids,
M-RoPE included, are its own business).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trp.models.image_encoding import ImageEncoding
from trp.vrt.binding import ImageBinding

__all__ = ["HFVLMHost", "LORA_TARGETS"]

# The attention projections of Qwen2 / Llama decoders (PaDT's and most VLM recipes' choice).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
_ADAPTER_CONFIG = "trp_adapter_config.json"
_ADAPTER_WEIGHTS = "trp_adapter.safetensors"
# Parameter-name prefixes of each part of the supported VLMs (transformers v5 layouts).
_PARTS: dict[str, tuple[str, ...]] = {
    "projector": ("model.visual.merger.", "model.multi_modal_projector."),
    "vision": ("model.visual.", "model.vision_tower."),
    "language": ("model.language_model.",),
}


class HFVLMHost(nn.Module):
    """Wrap a transformers VLM (``AutoModelForImageTextToText``) for
    :class:`trp.models.TRPForConditionalGeneration`.

    Args:
        model: the VLM; its base model (``model.model``) must have ``get_image_features`` and a
            ``forward`` that takes ``mm_encoder_outputs``.
    Raises:
        TypeError: naming what the model lacks.
    """

    def __init__(self, model: nn.Module, *, base_dir: str | Path | None = None) -> None:
        super().__init__()
        name = type(model).__name__
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "get_image_features"):
            raise TypeError(
                f"{name} is not a supported VLM: its base model (.model) has no "
                "get_image_features()"
            )
        if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters:
            raise TypeError(
                f"{name}: its base model's forward takes no mm_encoder_outputs (precomputed "
                "image features), which trp needs to run the vision tower once per step"
            )
        config = model.config
        image_token = getattr(config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(config, "image_token_index", None)
        if image_token is None:
            raise TypeError(f"{name}: its config names no image_token_id")
        self.model = model
        self.image_token_id = int(image_token)
        self._takes_grid = "image_grid_thw" in inspect.signature(base.get_image_features).parameters
        vision = config.vision_config
        self.merge = int(getattr(vision, "spatial_merge_size", 1))
        self.patch_size = int(getattr(vision, "patch_size", 14))
        self.square_size = int(getattr(vision, "image_size", 0) or 0)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vision_dim = int(text.hidden_size)
        # Where the base weights live (LoRA checkpoints store adapters and point here).
        self.base_dir = None if base_dir is None else str(Path(base_dir).resolve())
        self.lora: dict[str, Any] | None = None

    # ------------------------------------------------------------------ HF plumbing
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs)

    # ------------------------------------------------------------------ training set-up
    def part_of(self, name: str) -> str | None:
        """``"vision"``, ``"projector"``, ``"language"`` or ``None`` for a parameter name."""
        for part, prefixes in _PARTS.items():
            if name.startswith(prefixes):
                return part
        return None

    def freeze(self, parts: Sequence[str]) -> list[str]:
        """Stop training the named parts (``vision``, ``projector``, ``language``); the token
        embeddings and LM head stay trainable (the TRP tokens are new rows). Returns the
        frozen parameter names."""
        unknown = sorted(set(parts) - set(_PARTS))
        if unknown:
            raise ValueError(f"unknown parts {unknown}; known: {sorted(_PARTS)}")
        frozen = []
        for name, param in self.model.named_parameters():
            if self.part_of(name) in parts:
                param.requires_grad_(False)
                frozen.append(name)
        if parts and not frozen:
            raise ValueError(f"{type(self.model).__name__} has no parameters in parts {parts}")
        return frozen

    def enable_lora(
        self,
        *,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: Sequence[str] = LORA_TARGETS,
    ) -> int:
        """Inject LoRA adapters (``peft``) into the language model's ``target_modules``, in
        place (the module tree keeps its names); every base weight of the language model is
        frozen, the adapters, token embeddings and LM head train. Returns the adapter count."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora is not None:
            raise RuntimeError("LoRA is already enabled")
        if r < 1 or alpha < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad LoRA settings r={r}, alpha={alpha}, dropout={dropout}")
        names = [n for n, _ in self.model.named_modules() if n.startswith(_PARTS["language"])]
        present = sorted({n.rsplit(".", 1)[-1] for n in names} & set(target_modules))
        missing = sorted(set(target_modules) - set(present))
        if missing:
            raise ValueError(
                f"lora.target_modules {missing} are not modules of the language model of "
                f"{type(self.model).__name__}"
            )
        # Regex on full names: only the language model's projections, not the vision tower's.
        pattern = r"model\.language_model\..*\.(" + "|".join(target_modules) + r")"
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
        inject_adapter_in_model(config, self.model)
        for name, param in self.model.named_parameters():
            if self.part_of(name) == "language":
                param.requires_grad_("lora_" in name)
        self.lora = {
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "target_modules": list(target_modules),
        }
        return sum("lora_A" in n for n, _ in self.model.named_parameters())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The VLM's ``save_pretrained``; with LoRA, the adapters, token embeddings and LM
        head only (safetensors) plus the base directory they apply to."""
        path = Path(path)
        if self.lora is None:
            self.model.save_pretrained(path, **kwargs)
            return
        from safetensors.torch import save_file

        if self.base_dir is None:
            raise ValueError("a LoRA host needs base_dir (where its base weights live) to save")
        path.mkdir(parents=True, exist_ok=True)
        embed = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings().weight
        tensors = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        tensors["trp.input_embeddings"] = embed
        if head.data_ptr() != embed.data_ptr():
            tensors["trp.output_embeddings"] = head
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path / _ADAPTER_WEIGHTS)
        meta = {"base_dir": self.base_dir, "lora": self.lora, "vocab_rows": int(embed.shape[0])}
        (path / _ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> HFVLMHost:
        """Load a local VLM directory (``AutoModelForImageTextToText``, local files only), or
        what :meth:`save_pretrained` wrote for a LoRA host (base + adapters, strictly)."""
        from transformers import AutoModelForImageTextToText

        path = Path(path)
        kwargs.setdefault("local_files_only", True)
        if not (path / _ADAPTER_CONFIG).is_file():
            if not path.is_dir():
                raise FileNotFoundError(f"model directory not found: {path}")
            return cls(
                AutoModelForImageTextToText.from_pretrained(str(path), **kwargs), base_dir=path
            )
        from safetensors.torch import load_file

        meta = json.loads((path / _ADAPTER_CONFIG).read_text())
        host = cls(
            AutoModelForImageTextToText.from_pretrained(meta["base_dir"], **kwargs),
            base_dir=meta["base_dir"],
        )
        host.model.resize_token_embeddings(int(meta["vocab_rows"]))
        host.enable_lora(**{**meta["lora"]})
        tensors = load_file(str(path / _ADAPTER_WEIGHTS))
        embed = tensors.pop("trp.input_embeddings")
        head = tensors.pop("trp.output_embeddings", None)
        with torch.no_grad():
            host.model.get_input_embeddings().weight.copy_(embed)
            if head is not None:
                host.model.get_output_embeddings().weight.copy_(head)
        own = {n for n, _ in host.model.named_parameters() if "lora_" in n}
        if set(tensors) != own:
            raise ValueError(
                f"{path}: adapter weights do not match the model (missing "
                f"{sorted(own - set(tensors))[:4]}, unexpected {sorted(set(tensors) - own)[:4]})"
            )
        host.model.load_state_dict(tensors, strict=False)
        return host

    # ------------------------------------------------------------------ image side
    def encode_images(self, pixel_values: Tensor, **image_inputs: Any) -> ImageEncoding:
        """Run the vision tower once: merged patch tokens at the LM width, per-image maps
        (padded to the largest grid, with padding masks) and ``mm_encoder_outputs``."""
        base = self.model.model
        forward_args = inspect.signature(base.forward).parameters
        unknown = sorted(k for k in image_inputs if k not in forward_args)
        if unknown:
            raise ValueError(f"{type(self.model).__name__} takes no inputs named {unknown}")
        if self._takes_grid:
            grid_thw = image_inputs.get("image_grid_thw")
            if grid_thw is None:
                raise ValueError(f"{type(self.model).__name__} needs image_grid_thw")
            out = base.get_image_features(pixel_values, grid_thw, return_dict=True)
        else:
            out = base.get_image_features(pixel_values=pixel_values, return_dict=True)
        pooled = out.pooler_output
        per_image = list(pooled) if isinstance(pooled, list | tuple) else list(pooled.unbind(0))
        grids = self._grids(per_image, image_inputs.get("image_grid_thw"))
        flat = torch.cat(per_image, dim=0)  # ΣP x D
        binding = ImageBinding.from_grids([list(g) for g in grids], [1] * len(grids), vrt_base=1)
        maps, padding = binding.feature_maps(flat)
        pixels = self._pixels_per_token(grids)
        size = (maps.shape[-2] * pixels, maps.shape[-1] * pixels)
        # The processor's other tensors (image_grid_thw, mm_token_type_ids, …) go to the
        # VLM's forward / generate with the precomputed features.
        host: dict[str, Any] = {**image_inputs, "mm_encoder_outputs": {"image": out}}
        return ImageEncoding(
            flat_tokens=flat,
            grids=tuple(grids),
            maps=(maps,),
            image_size=size,
            padding_masks=(padding,) if bool(padding.any()) else None,
            host_inputs=host,
        )

    def _grids(self, per_image: list[Tensor], grid_thw: Tensor | None) -> list[tuple[int, int]]:
        if grid_thw is not None:
            if int(grid_thw[:, 0].max()) != 1:
                raise ValueError("video inputs (t > 1) are not images")
            m = self.merge
            grids = [(int(h) // m, int(w) // m) for _, h, w in grid_thw.tolist()]
        else:
            grids = []
            for feats in per_image:
                side = math.isqrt(feats.shape[0])
                if side * side != feats.shape[0]:
                    raise ValueError(
                        f"{feats.shape[0]} image tokens do not form a square grid; pass the "
                        "processor's grid"
                    )
                grids.append((side, side))
        for g, feats in zip(grids, per_image):
            if g[0] * g[1] != feats.shape[0]:
                raise ValueError(f"image grid {g} does not match its {feats.shape[0]} tokens")
        return grids

    def _pixels_per_token(self, grids: list[tuple[int, int]]) -> int:
        if self._takes_grid:
            return self.patch_size * self.merge
        if self.square_size:
            return self.square_size // grids[0][0]
        return self.patch_size

    def language_states(
        self, input_ids: Tensor, attention_mask: Tensor, images: ImageEncoding
    ) -> Tensor:
        """The decoder's last hidden states ``[B, L, D]`` over full conversations, from the
        VLM's own base-model forward (image features reused, positions its own)."""
        return self.model.model(
            input_ids=input_ids, attention_mask=attention_mask, **images.host_inputs
        ).last_hidden_state
