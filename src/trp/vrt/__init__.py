"""trp.vrt: visual reference tokens (VRTs) bound per image.

Every merged image patch becomes a token the LM can read and emit: :class:`ImageBinding` maps
patches to images and samples, :class:`VRTPrototypes` turns patch features into token
embeddings, :class:`VRTEmbedding` / :class:`VRTHead` extend the input embedding and the LM head
per sample (:class:`VRTContext` optionally adds the LM's states at the patches to the output
rows), :mod:`trp.vrt.targets` picks target patches from masks and boxes and
:func:`vrt_token_loss` is the answers' token loss. See
``docs/vrt.md``.
"""

from trp.vrt.binding import ImageBinding
from trp.vrt.causal_lm import VRTCausalLM, VRTGeneration
from trp.vrt.context import VRTContext
from trp.vrt.embedding import VRTEmbedding
from trp.vrt.head import VRTHead
from trp.vrt.prototypes import VRTPrototypes
from trp.vrt.targets import (
    SamplingMode,
    box_coverage,
    mask_coverage,
    rasterize_box,
    robust_exclusions,
    sample_target_patches,
    target_patches,
)
from trp.vrt.token_loss import vrt_token_loss
from trp.vrt.visual_prompt import (
    VisualPromptEncoder,
    expand_vpt,
    prompt_coverage,
    prompt_masks,
    splice_prompt_tokens,
)

__all__ = [
    "ImageBinding",
    "SamplingMode",
    "VRTCausalLM",
    "VRTContext",
    "VRTEmbedding",
    "VRTGeneration",
    "VRTHead",
    "VRTPrototypes",
    "VisualPromptEncoder",
    "box_coverage",
    "expand_vpt",
    "mask_coverage",
    "prompt_coverage",
    "prompt_masks",
    "rasterize_box",
    "robust_exclusions",
    "sample_target_patches",
    "splice_prompt_tokens",
    "target_patches",
    "vrt_token_loss",
]
