"""Convolutional encoder and decoder of the VQ-VAE (van den Oord et al. 2017, arXiv 1711.00937, section 4.1).

Strided 4x4 convolutions halve the resolution ``log2(downsample)`` times; residual blocks are
``x + conv1x1(relu(conv3x3(relu(x))))`` as in the paper; a 1x1 convolution maps to the code dimension. The decoder
mirrors it with transposed convolutions. No normalisation layers: batch statistics would make ``encode`` of one
image depend on the others in its batch.

Shapes: images (B, C, H, W); latents (B, D, H / f, W / f) with f = ``downsample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from neat_lightning.choices import check_choice

Stem = Literal["strided", "patch"]


@dataclass(frozen=True)
class ConvVAEConfig:
    """Encoder/decoder shape.

    Attributes:
        in_channels: image channels (3 for RGB).
        channels: width of every convolution.
        n_res_blocks: residual blocks at the lowest resolution, in the encoder and again in the decoder.
        downsample: spatial reduction factor f, a power of two >= 2: an H x W image becomes H/f x W/f codes.
        embed_dim: code dimension D.
        stem: ``strided``: log2(f) stride-2 4x4 convolutions down and transposed convolutions up (the VQ-VAE
            paper); ``patch``: one f x f stride-f convolution down and one transposed back (ViT-VQGAN-style
            patchify), with all residual blocks at the token resolution -- about 10x fewer FLOPs, which is what
            lets the quickstart train on two CPU cores.
    """

    in_channels: int = 3
    channels: int = 64
    n_res_blocks: int = 2
    downsample: int = 4
    embed_dim: int = 64
    stem: Stem = "strided"

    def __post_init__(self) -> None:
        check_choice("stem", self.stem, Stem)
        for name in ("in_channels", "channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_res_blocks < 0:
            raise ValueError(f"n_res_blocks={self.n_res_blocks} must be >= 0")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample={self.downsample} must be a power of two >= 2")

    @property
    def levels(self) -> int:
        return int(math.log2(self.downsample))


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Encoder(nn.Module):
    """(B, C, H, W) images -> (B, D, H/f, W/f) continuous latents."""

    def __init__(self, cfg: ConvVAEConfig) -> None:
        super().__init__()
        ch = cfg.channels
        f = cfg.downsample
        layers: list[nn.Module]
        if cfg.stem == "patch":
            layers = [nn.Conv2d(cfg.in_channels, ch, f, stride=f)]  # one f x f patch -> one position
        else:
            layers = [nn.Conv2d(cfg.in_channels, ch, 3, padding=1)]
            for _ in range(cfg.levels):
                layers += [nn.ReLU(), nn.Conv2d(ch, ch, 4, stride=2, padding=1)]  # halves H and W
        layers += [nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [ResBlock(ch) for _ in range(cfg.n_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class Decoder(nn.Module):
    """(B, D, h, w) codes -> (B, C, h*f, w*f) images (unbounded; callers clamp to [0, 1] for display)."""

    def __init__(self, cfg: ConvVAEConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, ch, 3, padding=1)]
        layers += [ResBlock(ch) for _ in range(cfg.n_res_blocks)]
        if cfg.stem == "patch":
            f = cfg.downsample
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, cfg.in_channels, f, stride=f)]  # one position -> f x f
        else:
            for _ in range(cfg.levels):
                layers += [nn.ReLU(), nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]  # doubles H and W
            layers += [nn.ReLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)
