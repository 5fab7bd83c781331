"""SCUNet: the Swin-Conv U-Net denoiser (Zhang et al. 2022), written as plain modules.

A1111's "ScuNET GAN" and "ScuNET PSNR" are its authors' ``scunet_color_real_gan.pth`` and
``scunet_color_real_psnr.pth`` (``models/ScuNET``): blind denoisers for real photos that keep the
size (scale 1), so as an upscaler they clean the picture and a Lanczos resize makes the size.
The module's tensor names are the files' own, so they load unchanged.

The network is a U-Net of four levels: a 3x3 conv to ``dim`` channels (``m_head``); three levels
down (``m_down1..3``: blocks, then a 2x2 stride-2 conv doubling the channels), the bottom blocks
(``m_body``), three levels up (``m_up3..1``: a 2x2 stride-2 transposed conv halving them, then
blocks), each level's input plus the skip from the same level on the way down; a last 3x3 conv
(``m_tail``) after adding the head's output. No conv has a bias but the blocks' 1x1 convs.

A block (``ConvTransBlock``) mixes its channels with a 1x1 conv, sends the first half through a
residual conv pair (3x3, ReLU, 3x3) and the second through a Swin block, mixes the two with a
second 1x1 conv and adds the input. The Swin blocks are pre-norm window attention (8 x 8 windows,
heads of 32 channels, a learned bias per relative position and head, every second block shifted
by half a window with the regions the roll joined kept apart) and a GELU MLP four times as wide.

The picture is padded on the right and bottom to a multiple of 64 (reflection, replication where
a side is too short to reflect), so every level's windows tile it, and the result is cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .upscaler_swin import cached_mask, from_windows, pad_to_multiple, relative_position_index, to_windows

#: SCUNet's fixed window and head width (constants of the architecture, not in the files).
WINDOW = 8
HEAD_DIM = 32
#: The multiple the picture is padded to: the window at the third downsampling (8 x 2³).
MULTIPLE = 64


class WindowSelfAttention(nn.Module):
    """``msa``: attention within 8 x 8 windows, shifted by half a window when ``shift``."""

    def __init__(self, dim: int, *, shift: bool):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.shift = shift
        self.embedding_layer = nn.Linear(dim, 3 * dim)
        self.linear = nn.Linear(dim, dim)
        # (heads, 2w - 1, 2w - 1): the bias for each (dy, dx) offset
        self.relative_position_params = nn.Parameter(torch.zeros(self.heads, 2 * WINDOW - 1, 2 * WINDOW - 1))
        self.register_buffer("position_index", relative_position_index(WINDOW), persistent=False)
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        # the original fills with -inf: a token never loses its own region, so no row is all -inf
        return cached_mask(self._masks, h, w, WINDOW, WINDOW // 2, device, fill=float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C), H and W multiples of the window."""
        b, h, w, c = x.shape
        n = WINDOW * WINDOW
        half = WINDOW // 2
        if self.shift:
            x = torch.roll(x, (-half, -half), dims=(1, 2))
        windows = to_windows(x, WINDOW)  # (B * windows, N, C)
        q, k, v = self.embedding_layer(windows).view(-1, n, 3, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        table = self.relative_position_params.flatten(1)  # (heads, (2w - 1)²)
        bias = table[:, self.position_index].unsqueeze(0)  # (1, heads, N, N)
        if self.shift:
            mask = self._mask(h, w, x.device)
            bias = (bias + mask.unsqueeze(1).to(bias.dtype)).repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=HEAD_DIM ** -0.5)
        out = from_windows(self.linear(out.transpose(1, 2).reshape(-1, n, c)), WINDOW, h, w)
        if self.shift:
            out = torch.roll(out, (half, half), dims=(1, 2))
        return out


class SwinBlock(nn.Module):
    """``trans_block``: window attention and a GELU MLP (4x), each pre-norm and added to its input."""

    def __init__(self, dim: int, *, shift: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WindowSelfAttention(dim, shift=shift)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.msa(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvTransBlock(nn.Module):
    """Half the channels through a residual conv pair, half through a Swin block, between 1x1 convs."""

    def __init__(self, half: int, *, shift: bool):
        super().__init__()
        self.half = half
        self.conv1_1 = nn.Conv2d(2 * half, 2 * half, 1)
        self.conv1_2 = nn.Conv2d(2 * half, 2 * half, 1)
        self.conv_block = nn.Sequential(nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.ReLU(),
                                        nn.Conv2d(half, half, 3, 1, 1, bias=False))
        self.trans_block = SwinBlock(half, shift=shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, trans = self.conv1_1(x).split(self.half, dim=1)
        conv = self.conv_block(conv) + conv
        trans = self.trans_block(trans.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv, trans), dim=1))


def _blocks(half: int, count: int) -> list[nn.Module]:
    """``count`` blocks of 2 x ``half`` channels, every second one shifted."""
    return [ConvTransBlock(half, shift=bool(i % 2)) for i in range(count)]


class SCUNet(nn.Module):
    """SCUNet for RGB pictures: ``dim`` channels at the top level (2, 4, 8 times that below);
    ``config`` the seven levels' block counts (down 1-3, body, up 3-1)."""

    def __init__(self, *, dim: int, config: list[int]):
        super().__init__()
        self.scale = 1
        d1, d2, d3, body, u3, u2, u1 = config
        self.m_head = nn.Sequential(nn.Conv2d(3, dim, 3, 1, 1, bias=False))
        self.m_down1 = nn.Sequential(*_blocks(dim // 2, d1), nn.Conv2d(dim, 2 * dim, 2, 2, bias=False))
        self.m_down2 = nn.Sequential(*_blocks(dim, d2), nn.Conv2d(2 * dim, 4 * dim, 2, 2, bias=False))
        self.m_down3 = nn.Sequential(*_blocks(2 * dim, d3), nn.Conv2d(4 * dim, 8 * dim, 2, 2, bias=False))
        self.m_body = nn.Sequential(*_blocks(4 * dim, body))
        self.m_up3 = nn.Sequential(nn.ConvTranspose2d(8 * dim, 4 * dim, 2, 2, bias=False), *_blocks(2 * dim, u3))
        self.m_up2 = nn.Sequential(nn.ConvTranspose2d(4 * dim, 2 * dim, 2, 2, bias=False), *_blocks(dim, u2))
        self.m_up1 = nn.Sequential(nn.ConvTranspose2d(2 * dim, dim, 2, 2, bias=False), *_blocks(dim // 2, u1))
        self.m_tail = nn.Sequential(nn.Conv2d(dim, 3, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x1 = self.m_head(pad_to_multiple(x, MULTIPLE))
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        y = self.m_body(x4)
        y = self.m_up3(y + x4)
        y = self.m_up2(y + x3)
        y = self.m_up1(y + x2)
        return self.m_tail(y + x1)[..., :h, :w]
