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

from .upscaler_swin import (SWINIR_MEAN, add_shuffle_tail, from_windows, pad_to_multiple, relative_position_index,
                            residual_conv, shift_mask, to_windows)

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


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Swin2Block(nn.Module):
    """Post-norm cosine window attention (shifted by ``shift``) and MLP, each added to its input."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int, *, qkv_bias: bool = True):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CosineWindowAttention(dim, window, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C), H and W multiples of the window."""
        _, h, w, _ = x.shape
        y = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2)) if self.shift else x
        y = from_windows(self.attn(to_windows(y, self.window), mask if self.shift else None), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + self.norm1(y)
        return x + self.norm2(self.mlp(x))


class _Blocks(nn.Module):
    def __init__(self, blocks: list[Swin2Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


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


class Swin2SR(nn.Module):
    """Swin2SR for RGB pictures. ``upsampler``: "pixelshuffle", "pixelshuffle_aux", "pixelshuffledirect",
    "nearest+conv" (4x) or "" (1x: the input plus a last conv of the features)."""

    def __init__(self, *, embed_dim: int, depths: list[int], heads: list[int], window: int, mlp_hidden: int,
                 upsampler: str, factors: list[int], num_feat: int = 64, three_conv: bool = False,
                 patch_norm: bool = True, qkv_bias: bool = True, img_range: float = 1.0):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.upsampler, self.img_range = upsampler, img_range
        self.scale = math.prod(factors)
        self.register_buffer("mean", torch.tensor(SWINIR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = _Proj(embed_dim, norm=patch_norm)
        self.layers = nn.ModuleList(RSTB2(embed_dim, depth, h, window, mlp_hidden, three_conv=three_conv,
                                          qkv_bias=qkv_bias) for depth, h in zip(depths, heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, three_conv)
        if upsampler == "pixelshuffle_aux":
            add_shuffle_tail(self, "pixelshuffle", embed_dim, num_feat, factors, self.scale)
            self.conv_bicubic = nn.Conv2d(3, num_feat, 3, 1, 1)
            self.conv_aux = nn.Conv2d(num_feat, 3, 3, 1, 1)
            self.conv_after_aux = nn.Sequential(nn.Conv2d(3, num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
        elif add_shuffle_tail(self, upsampler, embed_dim, num_feat, factors, self.scale):
            pass  # "pixelshuffle" or "pixelshuffledirect"
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        elif upsampler == "":
            self.conv_last = nn.Conv2d(embed_dim, 3, 3, 1, 1)
        else:
            raise ValueError(f"unknown Swin2SR upsampler {upsampler!r}")
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._masks:
            if len(self._masks) >= 4:
                self._masks.clear()
            self._masks[key] = shift_mask(h, w, self.window, self.shift, device)
        return self._masks[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        if self.patch_embed.norm is not None:
            tokens = self.patch_embed.norm(tokens)
        mask = self._mask(x.shape[-2], x.shape[-1], x.device) if self.shift else None
        for layer in self.layers:
            tokens = layer(tokens, mask)
        return self.norm(tokens).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        x = (pad_to_multiple(x, self.window) - mean) * self.img_range
        if self.upsampler == "":
            feat = self.conv_first(x)
            out = x + self.conv_last(self.conv_after_body(self.features(feat)) + feat)
        else:
            feat = self.conv_first(x)
            feat = self.conv_after_body(self.features(feat)) + feat
            if self.upsampler == "pixelshuffle":
                out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
            elif self.upsampler == "pixelshuffle_aux":
                size = (h * self.scale, w * self.scale)  # the padded input stretched to the unpadded output's size
                bicubic = self.conv_bicubic(F.interpolate(x, size=size, mode="bicubic", align_corners=False))
                aux = self.conv_aux(self.conv_before_upsample(feat))
                up = self.upsample(self.conv_after_aux(aux))[..., : size[0], : size[1]]
                out = self.conv_last(up + bicubic)
            elif self.upsampler == "pixelshuffledirect":
                out = self.upsample(feat)
            else:  # nearest+conv
                y = self.conv_before_upsample(feat)
                y = F.leaky_relu(self.conv_up1(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
                y = F.leaky_relu(self.conv_up2(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
                out = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        out = out / self.img_range + mean
        return out[..., : h * self.scale, : w * self.scale]
