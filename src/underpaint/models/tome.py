"""Token merging for Stable Diffusion's UNet (ToMe for SD; Bolya & Hoffman 2023), as AUTOMATIC1111
offers it: a speed/quality trade-off that is off unless a request asks for it.

Before the self-attention of each transformer block at the latent's full resolution, the block's
tokens (one per latent cell) are split into *dst* tokens, the top-left cell of every 2×2 square,
and *src* tokens, the rest. Each src token finds its most similar dst token (cosine similarity of
the block's input); the ``r = int(tokens * ratio)`` src tokens with the best matches are averaged
into their dst token, so self-attention runs on ``tokens - r`` tokens. Its output is copied back
to every merged position ("unmerge"). Cross-attention and the feed-forward layer see all tokens.
These are the choices A1111 makes (``ratio``; fixed dst positions, no random ones; self-attention
only; blocks with no downsampling, the library's ``max_downsample`` 1).

What that means per model family:

* SD 1.x/2.x: the five transformer blocks at the latent's full resolution (two on the way down,
  three on the way up; 64×64 cells for a 512² picture) merge; the deeper ones, where attention is
  already cheap, do not.
* SDXL: its full-resolution level has no attention at all, so nothing merges and the pictures are
  the same as without merging (as in A1111, where the setting does nothing for SDXL).
* FLUX: its transformer has no UNet levels; A1111/Forge offer token merging for SD UNets only,
  and :func:`request_token_merging` leaves FLUX models alone.

Merging is applied for one request with :func:`token_merging` (a context manager): forward hooks
on the UNet and its transformer blocks, removed on exit, so the model is exactly as before and
two models never share any state. A UNet compiled with ``--optimize compile``/``cuda_graphs``
runs uncompiled while a request merges tokens: ``torch.compile`` does not notice hooks added to
or removed from a compiled model (``torch._dynamo.config.skip_nnmodule_hook_guards``), so its
cached code would run as it was first traced. The compiled code is put back on exit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..errors import InvalidParameter
from ..params import MAX_TOKEN_MERGING_RATIO as MAX_RATIO
#: dst tokens are one per STRIDE×STRIDE square of cells.
STRIDE = 2
#: Blocks whose token grid is downsampled by at most this merge (1: the full latent resolution only).
MAX_DOWNSAMPLE = 1


def check_ratio(ratio: object, field_name: str = "token_merging_ratio") -> float:
    """A merging ratio from 0 to 0.9, as a float."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 <= ratio <= MAX_RATIO:
        raise InvalidParameter(field_name, ratio, f"a number from 0 to {MAX_RATIO}")
    return float(ratio)


# --- matching, merging, unmerging --------------------------------------------------------------


@dataclass(frozen=True)
class TokenMatch:
    """Which tokens of a ``(batch, tokens, channels)`` sequence merge into which.

    ``src``/``dst`` are token positions (shared by the batch); ``kept``, ``moved`` index the src
    list per batch row (``moved`` merge, ``kept`` stay), ``target`` the dst list (where each moved
    token goes).
    """

    tokens: int
    src: torch.Tensor  # (S,)
    dst: torch.Tensor  # (D,)
    kept: torch.Tensor  # (B, S - r)
    moved: torch.Tensor  # (B, r)
    target: torch.Tensor  # (B, r)

    @property
    def merged_tokens(self) -> int:
        return self.kept.shape[1] + self.dst.shape[0]


def split_positions(height: int, width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) token positions of a ``height`` × ``width`` grid in raster order: dst is the
    top-left cell of every whole STRIDE×STRIDE square; src every other cell, including a last row
    or column that makes no whole square."""
    is_dst = torch.zeros(height, width, dtype=torch.bool, device=device)
    rows, cols = height // STRIDE * STRIDE, width // STRIDE * STRIDE
    is_dst[0:rows:STRIDE, 0:cols:STRIDE] = True
    flat = is_dst.flatten()
    positions = torch.arange(height * width, device=device)
    return positions[~flat], positions[flat]


def match_tokens(metric: torch.Tensor, height: int, width: int, ratio: float) -> TokenMatch | None:
    """Bipartite soft matching on ``metric`` (batch, height·width, channels): the ``int(tokens ·
    ratio)`` src tokens most similar to some dst token (at most all src tokens) move into it.
    None when nothing would merge."""
    batch, tokens, _ = metric.shape
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens do not make a {height}x{width} grid")
    src, dst = split_positions(height, width, metric.device)
    r = min(int(tokens * ratio), src.shape[0])
    if r <= 0 or dst.shape[0] == 0:
        return None
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit.index_select(1, src) @ unit.index_select(1, dst).transpose(1, 2)  # (B, S, D)
        best, best_dst = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        moved, kept = order[:, :r], order[:, r:]
        target = best_dst.gather(1, moved)
    return TokenMatch(tokens, src, dst, kept, moved, target)


def _rows(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def merge_tokens(x: torch.Tensor, match: TokenMatch) -> torch.Tensor:
    """(batch, tokens, C) → (batch, kept + dst, C): the kept src tokens, then each dst token
    averaged with the src tokens moved into it."""
    channels = x.shape[-1]
    src, dst = x.index_select(1, match.src), x.index_select(1, match.dst)
    kept = src.gather(1, _rows(match.kept, channels))
    moved = src.gather(1, _rows(match.moved, channels))
    dst = dst.scatter_reduce(1, _rows(match.target, channels), moved, reduce="mean", include_self=True)
    return torch.cat([kept, dst], dim=1)


def unmerge_tokens(y: torch.Tensor, match: TokenMatch) -> torch.Tensor:
    """The inverse layout of :func:`merge_tokens`: every position gets the value of the token it
    was merged into (dst and kept positions their own)."""
    batch, _, channels = y.shape
    n_kept = match.kept.shape[1]
    kept, dst = y[:, :n_kept], y[:, n_kept:]
    out = y.new_empty(batch, match.tokens, channels)
    out[:, match.dst] = dst
    out.scatter_(1, _rows(match.src[match.kept], channels), kept)
    out.scatter_(1, _rows(match.src[match.moved], channels), dst.gather(1, _rows(match.target, channels)))
    return out


# --- hooks -------------------------------------------------------------------------------------


@dataclass
class _Request:
    """One request's merging: its ratio, and the latent size of the UNet call in progress."""

    ratio: float
    max_downsample: int
    latent_size: tuple[int, int] | None = None
    #: The match of the block whose self-attention runs now, by block.
    matches: dict[int, TokenMatch | None] = field(default_factory=dict)

    def on_unet(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    def on_block(self, key: int, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.matches[key] = self._match(hidden)

    def _match(self, hidden: torch.Tensor) -> TokenMatch | None:
        if self.latent_size is None or hidden.ndim != 3:
            return None
        height, width = self.latent_size
        downsample = math.ceil(math.sqrt((height * width) // hidden.shape[1]))
        if downsample > self.max_downsample:
            return None
        grid_h, grid_w = math.ceil(height / downsample), math.ceil(width / downsample)
        if grid_h * grid_w != hidden.shape[1]:
            return None
        return match_tokens(hidden, grid_h, grid_w, self.ratio)

    def before_attention(self, key: int, _module: torch.nn.Module, args: tuple, kwargs: dict):
        match = self.matches.get(key)
        if match is None:
            return None
        if args:
            return (merge_tokens(args[0], match), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": merge_tokens(kwargs["hidden_states"], match)}

    def after_attention(self, key: int, _module: torch.nn.Module, _args: tuple, output: Any):
        match = self.matches.pop(key, None)
        return None if match is None else unmerge_tokens(output, match)


def transformer_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's diffusers ``BasicTransformerBlock``s (with their self-attention ``attn1``)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock) and getattr(m, "attn1", None) is not None]


@contextmanager
def token_merging(unet: torch.nn.Module, ratio: float, *, max_downsample: int = MAX_DOWNSAMPLE) -> Iterator[int]:
    """Merge tokens in ``unet``'s self-attention at ``ratio`` inside the ``with`` block; yields
    the number of transformer blocks watched (ratio 0: none, and nothing is touched)."""
    ratio = check_ratio(ratio)
    if ratio == 0:
        yield 0
        return
    request = _Request(ratio, max_downsample)
    blocks = transformer_blocks(unet)
    from .optimize import eager

    handles = [unet.register_forward_pre_hook(request.on_unet, with_kwargs=True)]
    try:
        for key, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(partial(request.on_block, key), with_kwargs=True))
            handles.append(block.attn1.register_forward_pre_hook(partial(request.before_attention, key),
                                                                 with_kwargs=True))
            handles.append(block.attn1.register_forward_hook(partial(request.after_attention, key)))
        with eager(unet):  # see the module docstring: compiled code ignores hooks
            yield len(blocks)
    finally:
        for handle in handles:
            handle.remove()


def request_token_merging(model: Any, ratio: float):
    """The context for one sampling run of a loaded model: :func:`token_merging` on its UNet, or
    nothing for ratio 0 and for FLUX (no UNet; see the module docstring)."""
    if not ratio:
        return nullcontext(0)
    from ..pipeline.flux import is_flux

    if is_flux(model):
        return nullcontext(0)
    return token_merging(model.unet, ratio)
