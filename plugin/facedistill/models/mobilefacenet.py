"""MobileFaceNet (Chen et al. 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification
on Mobile Devices", arXiv:1804.07573), the student of MarginDistillation (Svitov & Alyamkin 2020,
arXiv:2003.02586).

Architecture (paper, Table 1), input 112x112x3:

====================  ========================  ===  ====  ===  ===
input                 operator                   t    c     n    s
====================  ========================  ===  ====  ===  ===
112x112x3             conv 3x3                   -    64    1    2
56x56x64              depthwise conv 3x3         -    64    1    1
56x56x64              bottleneck                 2    64    5    2
28x28x64              bottleneck                 4    128   1    2
14x14x128             bottleneck                 2    128   6    1
14x14x128             bottleneck                 4    128   1    2
7x7x128               bottleneck                 2    128   2    1
7x7x128               conv 1x1                   -    512   1    1
7x7x512               linear GDConv 7x7          -    512   1    1
1x1x512               linear conv 1x1            -    d     1    1
====================  ========================  ===  ====  ===  ===

with PReLU after every non-linear convolution and BatchNorm after every convolution. A bottleneck is the
MobileNetV2 inverted residual (1x1 expand to t*c_in, depthwise 3x3, linear 1x1 project), residual only when
stride is 1 and the width is unchanged.

Module layout and state_dict keys follow insightface's PyTorch port,
``deepinsight/insightface: recognition/arcface_torch/backbones/mobilefacenet.py`` (itself adapted from
cavaface), so a ``backbone.pth`` trained there with ``get_mbf`` loads into ``MobileFaceNet(scale=2)``. That
file describes the same table with ``blocks=(1, 4, 6, 2)``: ``blocks[0]`` is the depthwise conv (or a stack of
bottlenecks if > 1), and ``blocks[1:]`` are the stride-1 repeats after each stride-2 bottleneck of stages
(2, 64, 5, 2), (2, 128, 6, 1) and (2, 128, 2, 1). The embedding head is arcface_torch's ``GDC``: linear 7x7
depthwise conv + BN, flatten, ``Linear(512, d, bias=False)``, ``BatchNorm1d(d)`` with a learnable affine. (The
MXNet original, ``recognition/symbol/symbol_utils.py`` ``fc_type == "GDC"``, has a biased FC and fixes the BN
gamma to 1; ``fix_embedding_gamma=True`` reproduces the latter.)

insightface's ``mbf`` defaults to ``scale=2``: it doubles the block input/output widths (64->128, 128->256)
but keeps the expanded widths and the 64 groups of the first depthwise conv, giving 2.06M parameters. The
paper's network is ``scale=1``, the default here.

The input is an RGB face aligned to 112x112 and normalised to [-1, 1] (``(x / 255 - 0.5) / 0.5``, as in
arcface_torch); the output is the raw, un-normalised embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facedistill.models.registry import BACKBONES

__all__ = ["PAPER_BOTTLENECKS", "MobileFaceNet", "mbf", "mobilefacenet"]

# (t, c, n, s) rows of Table 1 in Chen et al. 2018; MobileFaceNet(scale=1, blocks=(1, 4, 6, 2)) builds them.
PAPER_BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)

_Pair = tuple[int, int]


class ConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm -> per-channel PReLU."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) -> BatchNorm, no activation: the paper's "linear" layers."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted-residual bottleneck: 1x1 expand to ``groups`` channels, depthwise kxk, linear 1x1 project.

    ``groups`` is the expanded width (t * c_in in the paper); the name is arcface_torch's.
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        residual: bool = False,
        kernel: _Pair = (3, 3),
        stride: _Pair = (2, 2),
        padding: _Pair = (1, 1),
        groups: int = 1,
    ) -> None:
        super().__init__()
        if residual and (in_c != out_c or stride != (1, 1)):
            raise ValueError("a residual bottleneck needs stride 1 and in_c == out_c")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel=kernel, stride=stride, padding=padding, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` stride-1 residual bottlenecks of constant width ``c``."""

    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(c, c, residual=True, stride=(1, 1), groups=groups) for _ in range(num_block))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution head: linear GDConv 7x7 -> flatten -> Linear -> BatchNorm1d.

    The GDConv replaces global average pooling because, as Chen et al. 2018 argue, the corner units
    of the 7x7 map see less of the face than the centre ones and deserve their own learned weights.
    """

    def __init__(
        self,
        embedding_size: int,
        in_c: int = 512,
        dropout: float = 0.0,
        fix_embedding_gamma: bool = False,
    ) -> None:
        super().__init__()
        # Indices 0..3 match arcface_torch's GDC.layers; dropout sits outside so it does not shift them.
        self.layers = nn.Sequential(
            LinearBlock(in_c, in_c, kernel=(7, 7), groups=in_c),
            nn.Flatten(1),
            nn.Linear(in_c, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(p=dropout)
        if fix_embedding_gamma:
            nn.init.constant_(self.layers[3].weight, 1.0)
            self.layers[3].weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gdconv, flatten, linear, bn = self.layers
        return bn(linear(self.dropout(flatten(gdconv(x)))))


class MobileFaceNet(nn.Module):
    """MobileFaceNet; ``forward`` maps [B, 3, 112, 112] to a raw [B, embedding_size] embedding.

    Args:
        embedding_size: output dimension d (the paper uses 128; arcface_torch and MarginDistillation 512).
        dropout: dropout probability before the embedding Linear (0 disables it, as in both references).
        scale: insightface's width multiplier for the block input/output widths; 1 is the paper's network,
            2 is arcface_torch's ``mbf``.
        blocks: insightface's repeat counts; ``(1, 4, 6, 2)`` is the paper's Table 1.
        fix_embedding_gamma: freeze the embedding BatchNorm1d's weight at 1 (MXNet ``fix_gamma=True``).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        dropout: float = 0.0,
        scale: int = 1,
        blocks: Sequence[int] = (1, 4, 6, 2),
        fix_embedding_gamma: bool = False,
    ) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four positive repeat counts, got {tuple(blocks)}")
        self.embedding_size = embedding_size
        self.scale = scale
        self.blocks = tuple(blocks)
        c64, c128 = 64 * scale, 128 * scale

        self.layers = nn.ModuleList([ConvBlock(3, c64, kernel=(3, 3), stride=(2, 2), padding=(1, 1))])
        if blocks[0] == 1:
            # groups=64, not c64: arcface_torch keeps 64 groups when scale > 1 and its checkpoints rely on it.
            self.layers.append(ConvBlock(c64, c64, kernel=(3, 3), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c64, blocks[0], groups=128))
        # Expanded widths are absolute (t * paper width), as in arcface_torch, so scale leaves them alone.
        self.layers.extend(
            [
                DepthWise(c64, c64, groups=128),
                Residual(c64, blocks[1], groups=128),
                DepthWise(c64, c128, groups=256),
                Residual(c128, blocks[2], groups=256),
                DepthWise(c128, c128, groups=512),
                Residual(c128, blocks[3], groups=256),
            ]
        )
        self.conv_sep = ConvBlock(c128, 512)
        self.features = GDC(embedding_size, 512, dropout=dropout, fix_embedding_gamma=fix_embedding_gamma)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # Same scheme as arcface_torch's mobilefacenet.py, so training recipes from there transfer.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        x = self.conv_sep(x)
        return self.features(x)


@BACKBONES.register("mobilefacenet")
def mobilefacenet(
    embedding_size: int = 512,
    dropout: float = 0.0,
    scale: int = 1,
    blocks: Sequence[int] = (1, 4, 6, 2),
    fix_embedding_gamma: bool = False,
) -> MobileFaceNet:
    """The paper's MobileFaceNet (Chen et al. 2018): about 1.0M parameters (d=128), 0.23 GMACs at 112x112."""
    return MobileFaceNet(embedding_size, dropout, scale, blocks, fix_embedding_gamma)


@BACKBONES.register("mbf")
def mbf(embedding_size: int = 512, dropout: float = 0.0, fix_embedding_gamma: bool = False) -> MobileFaceNet:
    """arcface_torch's ``mbf`` (``get_mbf``, ``scale=2``): the wider, key-compatible ~2.06M-param variant."""
    return MobileFaceNet(embedding_size, dropout, scale=2, fix_embedding_gamma=fix_embedding_gamma)
