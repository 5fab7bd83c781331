"""First Block Cache for FLUX.1 transformers: skip the blocks after the first while its output barely moves.

FLUX.1's transformer is a stack of double-stream blocks (image and text tokens in separate
streams) followed by single-stream blocks. First Block Cache (Cheng Zeyi's ParaAttention, known
from ComfyUI-WaveSpeed's "Apply First Block Cache" node and diffusers'
``FirstBlockCacheConfig``) runs the first block on every call and looks at how much its
image-stream residual (its output minus its input) changed:

    change = mean |r_now − r_full| / mean |r_full|

where ``r_full`` is that residual on the last call that ran every block. When ``change`` is at
most the threshold, the remaining blocks are skipped: the first block's outputs (image and
text streams) get the residuals the rest of the stack added on that last full call (its last
block's outputs minus the first block's outputs), and the final norm and projection run as
usual. Otherwise every block runs and the kept residuals refresh. Because the reference is the
last *full* call, slow drift adds up until it crosses the threshold and forces a refresh; the
first call always runs in full. Larger thresholds skip more calls: faster, further from the
uncached picture. It is a trade of quality for speed, off unless asked for. ComfyUI-WaveSpeed
suggests 0.12 for FLUX.1-dev.

Per model call: the decision is made on every transformer call, as diffusers and ComfyUI do;
a sampler step of a first-order sampler (Euler, the FLUX default) is one call with distilled
guidance. With true CFG (``cfg_scale`` > 1) conditional and unconditional rows go through the
transformer as one batch here, so one decision covers both, the change averaged over the whole
batch; diffusers' FluxPipeline makes two calls and decides for each alone (its "cond" and
"uncond" cache contexts). Should an evaluation make more than one call, each call position
keeps its own residuals, matched by call order as DeepCache does. Second-order samplers decide
per evaluation too. The results equal diffusers' ``FirstBlockCacheConfig`` wherever the calls
match (tests/test_first_block_cache.py); the change is measured in float32 (diffusers measures
in the model's dtype).

How: for the run, the transformer's blocks are swapped in their lists for small stand-ins that
call the real block, pass through, or add the kept residuals; ``FluxTransformer2DModel.forward``
runs unchanged around them and everything is put back afterwards. Skipped blocks do not run
their hooks, so under ``--vram low`` their weights stay off the device on skipped calls.

Refused with a FLUX ControlNet (its residuals are added after every block by the transformer's
loop, so a skipped call would count the last full call's residuals twice) and with
``--optimize compile``/``cuda_graphs`` (swapped modules would recompile the transformer every
request; the per-call decision needs a value on the host).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidParameter

log = logging.getLogger(__name__)

#: The block lists of diffusers' ``FluxTransformer2DModel``, in the order its forward runs them.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
#: ComfyUI-WaveSpeed's suggested threshold for FLUX.1-dev.
SUGGESTED_THRESHOLD = 0.12
#: Infotext key of the threshold.
INFOTEXT_KEY = "First block cache"

Streams = tuple[torch.Tensor, torch.Tensor]  # (encoder_hidden_states, hidden_states), as Flux blocks return


@dataclass
class _Kept:
    """What one call position keeps from its last full call."""

    shape: tuple[int, ...]
    head_residual: torch.Tensor  # the first block's image-stream output minus its input
    head_output: Streams
    tail_residual: Streams | None = None  # the last block's outputs minus the first block's


@dataclass
class CacheStats:
    """What a run did: per transformer call whether it ran in full, and the change that decided it
    (None on a call with nothing to compare with)."""

    full: list[bool] = field(default_factory=list)
    changes: list[float | None] = field(default_factory=list)

    @property
    def full_calls(self) -> int:
        return sum(self.full)

    @property
    def cached_calls(self) -> int:
        return len(self.full) - self.full_calls


def relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean |now − before| / mean |before|, in float32 (inf when ``before`` is all zeros)."""
    before = before.float()
    scale = before.abs().mean()
    change = (now.float() - before).abs().mean()
    return float(change / scale) if scale > 0 else float("inf")


def _streams(args: tuple, kwargs: dict) -> Streams:
    """(encoder_hidden_states, hidden_states) of a Flux block call, given by name or position."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return encoder, hidden


class _Head(torch.nn.Module):
    """Stands in for the first block: runs it and decides whether the rest of the stack runs."""

    def __init__(self, block: torch.nn.Module, cache: "FirstBlockCache"):
        super().__init__()
        self.block = block
        self._cache = (cache,)  # a tuple, so the cache is not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Streams:
        _, hidden_in = _streams(args, kwargs)
        encoder, hidden = self.block(*args, **kwargs)
        return self._cache[0].after_head(hidden_in, encoder, hidden)


class _Rest(torch.nn.Module):
    """Stands in for a later block: runs it on full calls, passes its inputs through on cached ones;
    the last block keeps the residual of the whole rest of the stack."""

    def __init__(self, block: torch.nn.Module, cache: "FirstBlockCache", *, tail: bool):
        super().__init__()
        self.block = block
        self.tail = tail
        self._cache = (cache,)

    def forward(self, *args: Any, **kwargs: Any) -> Streams:
        cache = self._cache[0]
        if not cache.computing:
            return _streams(args, kwargs)
        out = self.block(*args, **kwargs)
        if self.tail:
            cache.after_tail(out)
        return out


class FirstBlockCache:
    """The cache of one sampling run: install with :meth:`installed`; wrapping the sampler's
    denoiser with :meth:`wrap_denoiser` keys the kept residuals by call order within an evaluation
    (without it every call shares one set)."""

    def __init__(self, transformer: torch.nn.Module, threshold: float):
        self.transformer = transformer
        self.threshold = float(threshold)
        lists = [getattr(transformer, name) for name in BLOCK_LISTS]
        self.sites = [(blocks, i) for blocks in lists for i in range(len(blocks))]
        if len(self.sites) < 2:
            raise InvalidParameter("first_block_cache", threshold, "0 (off) for a transformer of fewer than two blocks")
        self.stats = CacheStats()
        #: Whether the blocks after the first run on the call in progress.
        self.computing = True
        self._kept: list[_Kept | None] = []
        self._slot = 0
        self._call = 0
        self._in_evaluation = False

    # --- the sampler side ------------------------------------------------------------------------

    def wrap_denoiser(self, denoiser: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The sampler's denoiser, marking where each model evaluation starts."""

        def evaluate(*args: Any, **kwargs: Any) -> torch.Tensor:
            self._in_evaluation, self._call = True, 0
            try:
                return denoiser(*args, **kwargs)
            finally:
                self._in_evaluation = False

        return evaluate

    # --- the transformer side --------------------------------------------------------------------

    @contextmanager
    def installed(self) -> Iterator["FirstBlockCache"]:
        """Swap the stand-ins in for the duration; the blocks are put back afterwards, also after an error."""
        originals = [blocks[i] for blocks, i in self.sites]
        last = len(self.sites) - 1
        try:
            for n, ((blocks, i), block) in enumerate(zip(self.sites, originals)):
                blocks[i] = _Head(block, self) if n == 0 else _Rest(block, self, tail=n == last)
            yield self
        finally:
            for (blocks, i), block in zip(self.sites, originals):
                blocks[i] = block
            self._kept.clear()
            self.computing = True
            if self.stats.full:
                log.info("First block cache: %d of %d transformer calls skipped the blocks after the first "
                         "(threshold %g)", self.stats.cached_calls, len(self.stats.full), self.threshold)

    def after_head(self, hidden_in: torch.Tensor, encoder: torch.Tensor, hidden: torch.Tensor) -> Streams:
        """Decide for this call from the first block's residual; on a cached call, answer for the whole stack."""
        self._slot = self._call if self._in_evaluation else 0
        self._call += 1
        while len(self._kept) <= self._slot:
            self._kept.append(None)
        kept = self._kept[self._slot]
        residual = hidden - hidden_in
        change = None
        if kept is not None and kept.tail_residual is not None and kept.shape == tuple(hidden.shape):
            change = relative_change(residual, kept.head_residual)
            if change <= self.threshold:
                self.computing = False
                self.stats.full.append(False)
                self.stats.changes.append(change)
                return encoder + kept.tail_residual[0], hidden + kept.tail_residual[1]
        self.computing = True
        self.stats.full.append(True)
        self.stats.changes.append(change)
        self._kept[self._slot] = _Kept(tuple(hidden.shape), residual, (encoder, hidden))
        return encoder, hidden

    def after_tail(self, out: Streams) -> None:
        """Keep what the blocks after the first added on this full call."""
        kept = self._kept[self._slot]
        encoder, hidden = out
        kept.tail_residual = (encoder - kept.head_output[0], hidden - kept.head_output[1])


def for_request(model: Any, threshold: float, *, control: Any = None) -> FirstBlockCache | None:
    """The run's cache, or None when ``threshold`` is 0 (off).

    Refuses an SD/SDXL model (DeepCache is theirs), a FLUX ControlNet and a compiled model, naming the field.
    """
    if not threshold:
        return None
    transformer = model.unet
    if not all(hasattr(transformer, name) for name in BLOCK_LISTS):
        raise InvalidParameter("first_block_cache", threshold,
                               "0 (off) for this model: First Block Cache is for FLUX transformers "
                               "(SD/SDXL: deepcache, --deepcache INTERVAL)")
    if control is not None:
        raise InvalidParameter("first_block_cache", threshold,
                               "0 (off) with FLUX ControlNet or IP-Adapter units (they join every block, which a "
                               "cached call would count twice)")
    from ..models.optimize import speed_of

    speed = speed_of(model)
    if speed.compiles:
        name = "cuda_graphs" if speed.cuda_graphs else "compile"
        raise InvalidParameter("first_block_cache", threshold,
                               f"0 (off) with --optimize {name} (cached calls swap transformer blocks, which the "
                               "compiled model would compile again for every request)")
    if speed.aot:
        raise InvalidParameter("first_block_cache", threshold,
                               "0 (off) with --optimize aot (cached calls swap transformer blocks, which the "
                               "ahead-of-time compiled package does not see)")
    return FirstBlockCache(transformer, threshold)


# --- infotext -----------------------------------------------------------------------------------


def infotext_entries(threshold: float) -> dict[str, float]:
    """The infotext key that records ``threshold`` (none when off)."""
    return {INFOTEXT_KEY: threshold} if threshold else {}


def threshold_from_infotext(values: dict[str, str]) -> float | None:
    """The threshold an infotext records, or None; a value that is not a number names its key."""
    if INFOTEXT_KEY not in values:
        return None
    try:
        return float(values[INFOTEXT_KEY])
    except ValueError:
        raise InvalidParameter(INFOTEXT_KEY, values[INFOTEXT_KEY], "a number from 0 to 1") from None
