"""``ConvStem``: a stride-4 feature map of the image for the pixel-level readouts of the heads;
``StemDownsample``: strided convolutions that continue it towards the ViT's patch grid.

A ViT with 16-pixel patches sees an 8 x 8 grid at 128 px: masks and boxes upsampled from it
cannot put an edge inside a patch. Mask2Former and SAM read their masks from stride-4 backbone
features; a plain ViT has none, so this stem supplies them, in one of two pixel-aligned forms
(:data:`STEM_KINDS`): ``patchify`` (a 4x4/4 convolution, then a 3x3 one at stride 4; ~11 MMAC
per 128 px image) or ``strided`` (two 4x4/2 convolutions; ~23 MMAC and a stride-2 map in
between).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["STEM_KINDS", "ConvStem", "StemDownsample"]

# The stem forms of :class:`ConvStem`, the default first.
STEM_KINDS = ("patchify", "strided")


class ConvStem(nn.Module):
    """``images [B, 3, H, W] -> [B, channels, H/4, W/4]``, in one of two forms (``kind``):

    * ``patchify``: conv4x4/4 - GN - GELU - conv3x3/1 (padding 1) - GN - GELU. The first
      convolution maps each 4 x 4 pixel block to its cell (a patch embedding at stride 4), the
      second mixes neighbouring cells (a 12-pixel receptive field). On a 2-core AVX2 CPU
      (AMD EPYC, fp32) forward + backward cost 13 ms at batch 16 against 64 ms for
      ``strided``, whose first convolution over 3 input channels and stride-2 map dominate;
      the default recipe trained to the same accuracy with it (docs/recipes.md, ablations).
    * ``strided``: conv4x4/2 (padding 1) - GN - GELU, twice (a 10-pixel receptive field); the
      form models saved before ``kind`` existed have.

    Both keep the map aligned with the pixels: output cell ``j`` is centred on pixel
    ``4j + 1.5``, the centre of the 4 x 4 block it stands for (and of the cell of a 1/4 mask
    target or of ``F.interpolate``'s grid). Padded 3x3/2 convolutions would centre cell ``j``
    on pixel ``4j``, 1.5 pixels up and left, and every mask and box read from them came out
    shifted by about a pixel.

    Args:
        channels: output channels (also the hidden width).
        in_channels: image channels.
        kind: ``patchify`` or ``strided`` (:data:`STEM_KINDS`).
    """

    stride = 4

    def __init__(self, channels: int = 32, in_channels: int = 3, kind: str = "patchify") -> None:
        super().__init__()
        if channels < 1 or in_channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels} and {in_channels}")
        if kind not in STEM_KINDS:
            raise ValueError(f"kind must be one of {STEM_KINDS}, got {kind!r}")
        self.channels = channels
        self.kind = kind
        self.num_features = channels  # what timm's HybridEmbed reads as the feature width
        if kind == "patchify":
            first = nn.Conv2d(in_channels, channels, kernel_size=4, stride=4)
            second = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        else:
            first = nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1)
            second = nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1)
        self.layers = nn.Sequential(
            first,
            nn.GroupNorm(1, channels),
            nn.GELU(),
            second,
            nn.GroupNorm(1, channels),
            nn.GELU(),
        )

    def forward(self, images: Tensor) -> Tensor:
        s = self.stride
        if images.dim() != 4 or images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(
                f"images must be [B, C, H, W] with H and W divisible by {s}, "
                f"got {list(images.shape)}"
            )
        return self.layers(images)


class StemDownsample(nn.Module):
    """``ConvStem`` + ``depth`` more conv3x3/2 - GN - GELU blocks, channels doubling (to
    ``stem.channels * 2**depth``): ``images -> [B, C, H / (4 * 2**depth), W / (4 * 2**depth)]``.

    As the patch embedding of a ViT (through timm's ``HybridEmbed``) this is the convolutional
    stem of Xiao et al. 2021 ("Early Convolutions Help Transformers See Better"): 3x3 strided
    convolutions down to the patch grid instead of one linear map of each patch's pixels, so
    corners and edges reach the transformer as features. The stem module is shared, not copied:
    the heads' fine features and the ViT train the same weights.

    Args:
        stem: the stride-4 :class:`ConvStem`.
        depth: number of stride-2 blocks after it (>= 1).
    """

    def __init__(self, stem: ConvStem, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.stem = stem
        blocks, width = [], stem.channels
        for _ in range(depth):
            blocks += [
                nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(1, 2 * width),
                nn.GELU(),
            ]
            width *= 2
        self.blocks = nn.Sequential(*blocks)
        self.stride = ConvStem.stride * 2**depth
        self.num_features = width  # what timm's HybridEmbed reads as the feature width

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[-2] % self.stride or images.shape[-1] % self.stride:
            raise ValueError(
                f"images must be [B, C, H, W] with H and W divisible by {self.stride}, "
                f"got {list(images.shape)}"
            )
        return self.blocks(self.stem(images))
