"""data2vec 2.0's convolutional decoder: restores a full-length sequence of target predictions from
the student's visible-token encodings (with noise at the masked positions, d2v_engine/objective/data2vec_v2.py).

A block is conv (kernel k, "same" length, groups g) -> LayerNorm over channels without affine ->
GELU, with a residual around every block whose input has the decoder's width (so not the first one
when embed_dim != dim). 1-D over time for audio and text; 2-D over the patch grid for images, as the
reference's Decoder1d / Decoder2d. A final projection (one Linear, or Linear-GELU-...-Linear with a
first hidden width dim * ratio: text) maps back to embed_dim, the targets' width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ConvBlock(nn.Module):
    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int, dims: int):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv(in_dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.even = kernel % 2 == 0  # an even kernel with padding k // 2 makes one step too many
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x T (or B x C x H x W) -> B x dim x T (H x W)."""
        y = self.conv(x)
        if self.even:
            y = y[..., :-1] if y.ndim == 3 else y[..., :-1, :-1]
        y = F.layer_norm(y.movedim(1, -1), (self.dim,)).movedim(-1, 1)
        return F.gelu(y)


def _projection(dim: int, out_dim: int, layers: int, ratio: float) -> nn.Module:
    if layers <= 1:
        return nn.Linear(dim, out_dim)
    mods, width = [], dim
    for i in range(layers - 1):
        nxt = int(width * ratio) if i == 0 else width
        mods += [nn.Linear(width, nxt), nn.GELU()]
        width = nxt
    mods.append(nn.Linear(width, out_dim))
    return nn.Sequential(*mods)


class ConvDecoder(nn.Module):
    """B x T x embed_dim -> B x T x embed_dim; `grid` (h, w) makes it 2-D with T = h * w."""

    def __init__(self, embed_dim: int, dim: int, kernel: int, groups: int, layers: int,
                 residual: bool = True, projection_layers: int = 1,
                 projection_ratio: float = 2.0, grid: tuple[int, int] | None = None):
        super().__init__()
        self.grid = tuple(grid) if grid is not None else None
        dims = 1 if grid is None else 2
        self.blocks = nn.ModuleList(
            _ConvBlock(embed_dim if i == 0 else dim, dim, kernel, groups, dims)
            for i in range(layers)
        )
        self.residual = residual
        self.proj = _projection(dim, embed_dim, projection_layers, projection_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        if self.grid is None:
            y = x.transpose(1, 2)
        else:
            h, w = self.grid
            if h * w != t:
                raise ValueError(f"ConvDecoder: {t} tokens do not fill the {h} x {w} grid")
            y = x.transpose(1, 2).reshape(b, c, h, w)
        for block in self.blocks:
            out = block(y)
            y = out + y if self.residual and out.shape == y.shape else out
        return self.proj(y.flatten(2).transpose(1, 2))
