"""``ConvStem``: a stride-4 feature map of the image for the pixel-level readouts of the heads;
``StemDownsample``: strided convolutions that continue it towards the ViT's patch grid.

A ViT with 16-pixel patches sees an 8 x 8 grid at 128 px: masks and boxes upsampled from it
cannot put an edge inside a patch. Mask2Former and SAM read their masks from stride-4 backbone
features; a plain ViT has none, so this stem (two strided 4x4 convolutions) supplies them,
at ~23 MMAC per 128 px image.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvStem", "StemDownsample"]


class ConvStem(nn.Module):
    """``images [B, 3, H, W] -> [B, channels, H/4, W/4]``: conv4x4/2 (padding 1) - GN - GELU,
    twice.

    The even kernels keep the map aligned with the pixels: output cell ``j`` is centred on
    pixel ``4j + 1.5``, the centre of the 4 x 4 block it stands for (and of the cell of a
    1/4 mask target or of ``F.interpolate``'s grid). Padded 3x3/2 convolutions centre cell
    ``j`` on pixel ``4j``, 1.5 pixels up and left, and every mask and box read from them came
    out shifted by about a pixel; on the CPU the 4x4 stem is no slower (27 vs 31 ms forward +
    backward at batch 32 in bf16).

    Args:
        channels: output channels (also the hidden width).
        in_channels: image channels.
    """

    stride = 4

    def __init__(self, channels: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        if channels < 1 or in_channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels} and {in_channels}")
        self.channels = channels
        self.num_features = channels  # what timm's HybridEmbed reads as the feature width
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(1, channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
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
