"""CodeFormer (Zhou et al., 2022, "Towards Robust Blind Face Restoration with Codebook Lookup Transformer"):
the face restorer A1111's "Restore faces" runs by default.

A VQGAN encoder turns a 512² aligned face into a 16x16 grid of features; a transformer predicts, for
each cell, which of the codebook's 1024 entries the clean face has there; the chosen entries,
re-normalised to the encoder features' per-channel mean and deviation (AdaIN), go through the VQGAN
decoder. At the 32-256 px levels the decoder's features are nudged towards the input's own
(Controllable Feature Transformation): ``dec + w · (dec · scale + shift)``, ``scale`` and ``shift``
computed from the encoder's and decoder's features together. ``w`` is A1111's "CodeFormer weight":
0 uses the codebook alone (strongest restoration), 1 keeps most of the input.

The layers carry the tensor names of the released ``codeformer-v0.1.0.pth`` (its ``params_ema``); the
transformer's width, depth, codebook and grid are read from the file, the VQGAN's widths are the
released model's (64 · 1, 2, 2, 4, 4, 8 over 512 → 16 px). Inference only; 8 attention heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError

__all__ = ["CodeFormer", "load_codeformer", "is_codeformer"]

_MARKERS = ("position_emb", "idx_pred_layer.1.weight", "quantize.embedding.weight", "encoder.blocks.0.weight")
_BASE, _MULTS = 64, (1, 2, 2, 4, 4, 8)
#: The encoder and decoder blocks whose outputs the feature transformation joins, by resolution.
_ENCODER_TAPS = {"512": 2, "256": 5, "128": 8, "64": 11, "32": 14, "16": 18}
_DECODER_TAPS = {"16": 6, "32": 9, "64": 12, "128": 15, "256": 18, "512": 21}
_HEADS = 8


def is_codeformer(names) -> bool:
    return all(m in names for m in _MARKERS)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.conv_out = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_out is None else self.conv_out(x))


class _Attn(nn.Module):
    """Single-head self-attention over the pixels, with 1x1 projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)
        k = self.k(h).reshape(b, c, -1)
        v = self.v(h).reshape(b, c, -1)
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Blocks(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def _encoder(embed: int) -> _Blocks:
    blocks: list[nn.Module] = [nn.Conv2d(3, _BASE, 3, 1, 1)]
    c, res = _BASE, 512
    for level, mult in enumerate(_MULTS):
        for _ in range(2):
            blocks.append(_Res(c, _BASE * mult))
            c = _BASE * mult
            if res == 16:
                blocks.append(_Attn(c))
        if level != len(_MULTS) - 1:
            blocks.append(_Down(c))
            res //= 2
    blocks += [_Res(c, c), _Attn(c), _Res(c, c), _norm(c), nn.Conv2d(c, embed, 3, 1, 1)]
    return _Blocks(blocks)


def _generator(embed: int) -> _Blocks:
    c = _BASE * _MULTS[-1]
    blocks: list[nn.Module] = [nn.Conv2d(embed, c, 3, 1, 1), _Res(c, c), _Attn(c), _Res(c, c)]
    res = 16
    for level in reversed(range(len(_MULTS))):
        for _ in range(2):
            blocks.append(_Res(c, _BASE * _MULTS[level]))
            c = _BASE * _MULTS[level]
            if res == 16:
                blocks.append(_Attn(c))
        if level != 0:
            blocks.append(_Up(c))
            res *= 2
    blocks += [_norm(c), nn.Conv2d(c, 3, 3, 1, 1)]
    return _Blocks(blocks)


class _Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


class _TransformerLayer(nn.Module):
    """Pre-norm self-attention (the position embedding added to queries and keys) and a GELU MLP."""

    def __init__(self, dim: int, mlp: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, _HEADS)
        self.linear1, self.linear2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h + pos, h + pos, value=h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class _Fuse(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.encode_enc = _Res(2 * c, c)

        def branch() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, padding=1))

        self.scale, self.shift = branch(), branch()

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        joined = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(joined) + self.shift(joined))


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``content`` with each channel's mean and (unbiased) deviation replaced by ``style``'s."""
    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    """``forward(face, weight)``: RGB faces in [-1, 1], ``[B, 3, 512, 512]``, aligned to FFHQ's 5-point
    template → restored faces in the same range (unclamped)."""

    def __init__(self, *, dim: int = 512, layers: int = 9, codebook: int = 1024, grid: int = 256,
                 embed: int = 256, connect: tuple[str, ...] = ("32", "64", "128", "256")):
        super().__init__()
        self.embed, self.connect = embed, connect
        self.encoder = _encoder(embed)
        self.quantize = _Codebook(codebook, embed)
        self.generator = _generator(embed)
        self.position_emb = nn.Parameter(torch.zeros(grid, dim))
        self.feat_emb = nn.Linear(embed, dim)
        self.ft_layers = nn.Sequential(*[_TransformerLayer(dim, 2 * dim) for _ in range(layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, codebook, bias=False))
        widths = {"16": 512, "32": 256, "64": 256, "128": 128, "256": 128, "512": 64}
        self.fuse_convs_dict = nn.ModuleDict({size: _Fuse(widths[size]) for size in connect})

    def forward(self, x: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
        taps = {_ENCODER_TAPS[size]: size for size in self.connect}
        encoded = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in taps:
                encoded[taps[i]] = x
        b, _, h, w = x.shape
        pos = self.position_emb.unsqueeze(1).expand(-1, b, -1)
        query = self.feat_emb(x.flatten(2).permute(2, 0, 1))
        for layer in self.ft_layers:
            query = layer(query, pos)
        codes = self.idx_pred_layer(query).permute(1, 0, 2).argmax(dim=2)  # [B, h·w]
        quant = self.quantize.embedding.weight[codes].view(b, h, w, self.embed).permute(0, 3, 1, 2)
        out = _adain(quant, x)
        fuse_at = {_DECODER_TAPS[size]: size for size in self.connect}
        for i, block in enumerate(self.generator.blocks):
            out = block(out)
            if i in fuse_at and weight > 0:
                out = self.fuse_convs_dict[fuse_at[i]](encoded[fuse_at[i]], out, weight)
        return out


def load_codeformer(sd: Mapping[str, torch.Tensor], source: str = "CodeFormer") -> CodeFormer:
    """A CodeFormer holding ``sd``'s tensors (``params_ema`` already unwrapped), in eval mode."""
    if not is_codeformer(sd):
        raise ModelError(f"{source}: not a CodeFormer model (expected {', '.join(_MARKERS)})")
    grid, dim = sd["position_emb"].shape
    layers = len({m.group(1) for k in sd if (m := re.match(r"ft_layers\.(\d+)\.", k))})
    connect = tuple(size for size in ("16", "32", "64", "128", "256", "512")
                    if f"fuse_convs_dict.{size}.scale.0.weight" in sd)
    from .loader import _assign

    with torch.device("meta"):
        net = CodeFormer(dim=dim, layers=layers, codebook=sd["idx_pred_layer.1.weight"].shape[0], grid=grid,
                         embed=sd["quantize.embedding.weight"].shape[1], connect=connect)
    return _assign(net, dict(sd), source, torch.device("cpu"), torch.float32)
