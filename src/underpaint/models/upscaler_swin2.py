"""Swin2SR: SwinIR with Swin Transformer V2's blocks (Conde et al. 2022), written as plain modules.

The files are the authors' (``Swin2SR_ClassicalSR_X2_64.pth``, ``Swin2SR_CompressedSR_X4_48.pth``,
``Swin2SR_RealworldSR_X4_64_BSRGAN_PSNR.pth``, ``Swin2SR_Lightweight_X2_64.pth``, the JPEG ones) and
others trained with their code; the module's tensor names are the files' own.

Where it differs from SwinIR (``upscaler_swin.py``):

- the blocks are post-norm: ``x + norm1(attention(x))``, then ``x + norm2(mlp(x))``;
- the attention is cosine attention: queries and keys L2-normalised, their products times
  ``exp(min(logit_scale, log 100))`` per head; the position bias comes from a small MLP (``cpb_mlp``)
  over log-spaced relative coordinates (±8 at the window's edge, then sign · log2(1 + |c|) / 3),
  through 16 · sigmoid; the key projection has no bias (``q_bias`` and ``v_bias`` only);
- a 1x1 conv (``patch_embed.proj``) follows the first conv's features before the patch norm, and one
  follows each group's residual conv (``layers.N.patch_embed.proj``);
- besides SwinIR's upsamplers, "pixelshuffle_aux" (the compressed-input models): the features go
  through a conv to a 3-channel auxiliary picture and back, are upsampled, and a conv of the bicubic
  enlargement of the input is added before the last conv.

The saved ``relative_coords_table``, ``relative_position_index`` and ``attn_mask`` buffers are derived
from the window, not read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .upscaler_swin import SwinBlock, SwinIR, _Blocks, pad_to_multiple, relative_position_index, residual_conv

#: The most a logit scale may reach (the original clamps at log 100).
_MAX_LOGIT = math.log(100.0)


def coords_table(window: int) -> torch.Tensor:
    """((2w - 1)², 2): each relative offset, scaled to ±8 at the window's edge and log-spaced, as
    Swin V2 feeds its bias MLP."""
    steps = torch.arange(-(window - 1), window, dtype=torch.float32)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    table = torch.stack((dy, dx), dim=-1) / max(window - 1, 1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.reshape(-1, 2)


class CosineWindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int, *, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.window = heads, window
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("table", coords_table(window), persistent=False)
        self.register_buffer("position_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B * windows, N, C); ``mask`` (windows, N, N) or None."""
        bw, n, c = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).view(bw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=_MAX_LOGIT).exp()
        table = self.cpb_mlp(self.table.to(x.dtype))  # ((2w-1)², heads)
        position = table[self.position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        scores = scores + 16 * torch.sigmoid(position).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            scores = (scores.view(bw // windows, windows, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                      ).view(bw, self.heads, n, n)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Swin2Block(SwinBlock):
    """SwinIR's block made post-norm, with cosine window attention: ``x + norm1(attention(x))``, then
    ``x + norm2(mlp(x))``."""

    attention = CosineWindowAttention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C), H and W multiples of the window."""
        x = x + self.norm1(self.attend(x, mask))
        return x + self.norm2(self.mlp(x))


class _Proj(nn.Module):
    """``patch_embed`` with patches of one pixel: a 1x1 conv (``proj``) and, at the top, a LayerNorm (``norm``)."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim) if norm else None


class RSTB2(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, hidden: int, *, three_conv: bool,
                 qkv_bias: bool = True):
        super().__init__()
        self.residual_group = _Blocks([Swin2Block(dim, heads, window, window // 2 if i % 2 else 0, hidden,
                                                  qkv_bias=qkv_bias) for i in range(depth)])
        self.conv = residual_conv(dim, three_conv)
        self.patch_embed = _Proj(dim, norm=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens."""
        y = x
        for block in self.residual_group.blocks:
            y = block(y, mask)
        y = self.patch_embed.proj(self.conv(y.permute(0, 3, 1, 2)))
        return y.permute(0, 2, 3, 1) + x


class Swin2SR(SwinIR):
    """Swin2SR for RGB pictures: SwinIR's frame (:class:`~.upscaler_swin.SwinIR`) with Swin V2's blocks, the
    1x1 convs after the first conv and each group's conv, and besides SwinIR's upsamplers
    "pixelshuffle_aux" (the compressed-input models)."""

    group = RSTB2

    def __init__(self, *, embed_dim: int, upsampler: str, patch_norm: bool = True, num_feat: int = 64, **kwargs):
        aux = upsampler == "pixelshuffle_aux"
        super().__init__(embed_dim=embed_dim, upsampler="pixelshuffle" if aux else upsampler, num_feat=num_feat,
                         patch_norm=patch_norm, **kwargs)
        self.upsampler = upsampler
        self.patch_embed = _Proj(embed_dim, norm=patch_norm)
        if aux:
            self.conv_bicubic = nn.Conv2d(3, num_feat, 3, 1, 1)
            self.conv_aux = nn.Conv2d(num_feat, 3, 3, 1, 1)
            self.conv_after_aux = nn.Sequential(nn.Conv2d(3, num_feat, 3, 1, 1), nn.LeakyReLU(0.01))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return super().features(self.patch_embed.proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsampler != "pixelshuffle_aux":
            return super().forward(x)
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        x = (pad_to_multiple(x, self.window) - mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.features(feat)) + feat
        size = (h * self.scale, w * self.scale)  # the padded input stretched to the unpadded output's size
        bicubic = self.conv_bicubic(F.interpolate(x, size=size, mode="bicubic", align_corners=False))
        aux = self.conv_aux(self.conv_before_upsample(feat))
        up = self.upsample(self.conv_after_aux(aux))[..., : size[0], : size[1]]
        out = self.conv_last(up + bicubic) / self.img_range + mean
        return out[..., : size[0], : size[1]]
