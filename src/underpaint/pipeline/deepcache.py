"""DeepCache for SD/SDXL UNets: the deep features of one step reused on the next few.

DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free") rests on
the observation that the UNet's deep, low-resolution features change little between adjacent
sampler steps while its shallow skip path carries the detail. Every ``interval`` steps the whole
UNet runs and the outputs of its deep part are kept; the steps in between run only ``conv_in``,
the down blocks up to a *branch*, the matching last up layers and ``conv_out``, with the kept
feature standing in for everything deeper. The speed-up grows with the interval and with a
shallower branch (0 is the shallowest: one resnet/attention pair at full resolution per side),
and so does the drift from the uncached picture: it is a trade of quality for speed, off unless
asked for.

Branches are numbered along the down path as in the paper's reference code: down block ``b``
(of ``n`` resnet layers) offers positions ``0 .. n`` (``n`` is just before its downsampler), so
an SD 1.5 UNet has branches 0-11 and SDXL's 0-8. Branch ``(b, l)`` keeps fresh the down block
layers below ``l`` of block ``b`` (and the blocks before it) and, on the way up, the last
``l + 1`` resnet layers of the up block at the same level (and the blocks after it).

How a cached call is made: for its duration each skipped module (a whole block, the mid block,
or single resnet/attention/downsampler layers of the branch's two blocks) is swapped in its
parent for a stand-in that returns what that module returned on the last full call. diffusers'
own ``UNet2DConditionModel.forward`` then runs unchanged around them, so SD 1.x/2.x, SDXL
(``text_time`` embeddings), 4- and 9-channel inputs and ControlNet / T2I-Adapter residuals all
take their usual path. Swapped-out blocks do not run their hooks either, so under ``--vram low``
their weights do not visit the device on cached steps.

Steps, not model calls: the schedule counts sampler steps (the progress callback's ticks). All
UNet calls of one model evaluation share that step's decision (classifier-free guidance as one
batch, or as separate calls for conditional and unconditional halves, each with its own kept
features, matched by call order). Second-order samplers (Heun, DPM2, DPM++ 2S/SDE, Restart)
evaluate between ticks: an evaluation belongs to the tick that follows it, so a Heun step's
correction at the next σ shares the full-or-cached decision of the evaluation that starts the
next step at that same σ. Every full evaluation refreshes the kept features. The reference
implementation counts UNet calls, which is the same thing for first-order samplers.

ControlNet / T2I-Adapter: their residuals still reach the skip connections that run fresh on a
cached step; those meant for the skipped deep blocks and the mid block have nothing to act on
until the next full step (the ControlNet itself still runs every step).

``torch.compile`` (``--optimize compile``/``cuda_graphs``) is refused with it: swapping modules
would make every request compile the UNet again, and CUDA graphs overwrite the kept outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidParameter
from ..params import DeepCacheOptions

log = logging.getLogger(__name__)


def branch_positions(unet: torch.nn.Module) -> list[tuple[int, int]]:
    """Every branch as (down block index, layer), in branch-number order."""
    return [(b, layer) for b, block in enumerate(unet.down_blocks) for layer in range(len(block.resnets) + 1)]


def locate_branch(unet: torch.nn.Module, branch: int) -> tuple[int, int]:
    """(down block, layer) of branch number ``branch`` on this UNet; InvalidParameter beyond its last one."""
    positions = branch_positions(unet)
    if not 0 <= branch < len(positions):
        raise InvalidParameter("deepcache_branch", branch, f"0 to {len(positions) - 1} for this model's UNet")
    return positions[branch]


@dataclass(frozen=True)
class _Site:
    """One module skipped on cached calls: where it hangs (parent, attribute) and its dotted name."""

    parent: torch.nn.Module
    attr: str
    module: torch.nn.Module
    name: str


def skipped_sites(unet: torch.nn.Module, block: int, layer: int) -> list[_Site]:
    """The modules a cached call replaces for branch (``block``, ``layer``), whole blocks as one."""
    sites: list[_Site] = []

    def add(parent: torch.nn.Module, attr: str, prefix: str) -> None:
        module = getattr(parent, attr) if not isinstance(parent, torch.nn.ModuleList) else parent[int(attr)]
        sites.append(_Site(parent, attr, module, f"{prefix}.{attr}" if prefix else attr))

    downs, ups = unet.down_blocks, unet.up_blocks
    for b in range(len(downs)):
        if b > block or (b == block and layer == 0):
            add(downs, str(b), "down_blocks")
    branch_block = downs[block]
    if layer > 0:
        for i in range(layer, len(branch_block.resnets)):
            add(branch_block.resnets, str(i), f"down_blocks.{block}.resnets")
            if getattr(branch_block, "attentions", None) is not None:
                add(branch_block.attentions, str(i), f"down_blocks.{block}.attentions")
        if branch_block.downsamplers is not None:
            for i in range(len(branch_block.downsamplers)):
                add(branch_block.downsamplers, str(i), f"down_blocks.{block}.downsamplers")
    if unet.mid_block is not None:
        add(unet, "mid_block", "")
    level = len(ups) - 1 - block  # the up block at the branch's level
    for u in range(level):
        add(ups, str(u), "up_blocks")
    up = ups[level]
    # Up layers count from the end: the last resnet (fed by the block's first skip) is layer 0.
    for i in range(len(up.resnets) - 1 - layer):
        add(up.resnets, str(i), f"up_blocks.{level}.resnets")
        if getattr(up, "attentions", None) is not None:
            add(up.attentions, str(i), f"up_blocks.{level}.attentions")
    return sites


class _Replay(torch.nn.Module):
    """Stands in for a skipped module: returns what it returned on the last full call. Carries the
    attributes ``UNet2DConditionModel.forward`` reads from a block (``has_cross_attention``, the
    number of ``resnets``)."""

    def __init__(self, original: torch.nn.Module, fetch: Callable[[], Any]):
        super().__init__()
        self.has_cross_attention = bool(getattr(original, "has_cross_attention", False))
        if hasattr(original, "resnets"):
            self.resnets = [None] * len(original.resnets)  # only its length is read
        self._fetch = fetch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fetch()


@dataclass
class CacheStats:
    """What a run did: UNet calls made in full and from the cache, modules skipped on cached calls."""

    full_calls: int = 0
    cached_calls: int = 0
    skipped_modules: list[str] = field(default_factory=list)


class DeepCache:
    """The cache of one sampling run: install with :meth:`installed`, wrap the sampler's denoiser
    with :meth:`wrap_denoiser` and its callback with :meth:`wrap_callback`."""

    def __init__(self, unet: torch.nn.Module, options: DeepCacheOptions):
        self.unet = unet
        self.options = options
        self.block, self.layer = locate_branch(unet, options.branch)
        self.sites = skipped_sites(unet, self.block, self.layer)
        self.stats = CacheStats(skipped_modules=[s.name for s in self.sites])
        #: Sampler steps finished so far (the callback's ticks): the step the next evaluation belongs to.
        self.step = 0
        self._full_evaluation: bool | None = None  # None: outside an evaluation (every call full)
        self._call = 0  # UNet calls so far in this evaluation
        #: Per call order within an evaluation: the input shape and each skipped module's output.
        self._kept: list[tuple[tuple[int, ...], dict[str, Any]]] = []
        self._recording: dict[str, Any] | None = None
        self._replaying: dict[str, Any] | None = None
        self._swapped = False

    # --- the schedule -------------------------------------------------------------------------

    def is_full_step(self, step: int) -> bool:
        """Whether sampler step ``step`` (0-based) runs the whole UNet."""
        o = self.options
        if step < o.start or (o.end is not None and step >= o.end):
            return True
        return (step - o.start) % o.interval == 0

    # --- hooks into the sampler -----------------------------------------------------------------

    def wrap_denoiser(self, denoiser: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The sampler's denoiser, marking where each model evaluation starts and ends."""

        def evaluate(*args: Any, **kwargs: Any) -> torch.Tensor:
            self._full_evaluation, self._call = self.is_full_step(self.step), 0
            try:
                return denoiser(*args, **kwargs)
            finally:
                self._full_evaluation = None

        return evaluate

    def wrap_callback(self, callback: Callable[..., Any] | None) -> Callable[..., Any]:
        """The sampler's step callback, counting the steps (its answer is passed on)."""

        def on_step(step: int, *args: Any) -> Any:
            self.step = step + 1
            return callback(step, *args) if callback is not None else None

        return on_step

    # --- hooks into the UNet --------------------------------------------------------------------

    @contextmanager
    def installed(self) -> Iterator["DeepCache"]:
        """Hook the UNet for the duration; everything is put back afterwards, also after an error."""
        handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                   self.unet.register_forward_hook(self._after, always_call=True)]
        handles += [site.module.register_forward_hook(self._recorder(site.name)) for site in self.sites]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._restore()
            self._kept.clear()
            if self.stats.full_calls + self.stats.cached_calls:
                log.info("DeepCache: %d of %d UNet calls cached (interval %d, branch %d)", self.stats.cached_calls,
                         self.stats.full_calls + self.stats.cached_calls, self.options.interval, self.options.branch)

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._restore()
        sample = args[0] if args else kwargs.get("sample")
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else ()
        slot = self._call
        self._call += 1
        kept = self._kept[slot] if slot < len(self._kept) else None
        if self._full_evaluation is False and kept is not None and kept[0] == shape:
            self.stats.cached_calls += 1
            self._replaying = kept[1]
            self._swap_in()
            return
        self.stats.full_calls += 1
        if self._full_evaluation is None:  # a call outside the sampler's evaluations: nothing to keep
            return
        self._recording = {}
        while len(self._kept) <= slot:
            self._kept.append(((), {}))
        self._kept[slot] = (shape, self._recording)

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._restore()
        self._recording = None
        self._replaying = None

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self._recording is not None:
                self._recording[name] = output

        return record

    def _swap_in(self) -> None:
        for site in self.sites:
            stand_in = _Replay(site.module, lambda name=site.name: self._replaying[name])
            setattr(site.parent, site.attr, stand_in)
        self._swapped = True

    def _restore(self) -> None:
        if not self._swapped:
            return
        for site in self.sites:
            setattr(site.parent, site.attr, site.module)
        self._swapped = False


def for_request(model: Any, options: DeepCacheOptions | None) -> DeepCache | None:
    """The run's cache, or None when ``options`` leave it off (interval 1 caches nothing).

    Refuses a compiled UNet and a UNet it does not know how to split, naming the field.
    """
    if options is None or options.interval <= 1:
        return None
    unet = model.unet
    if not all(hasattr(unet, name) for name in ("down_blocks", "up_blocks", "mid_block", "conv_in")):
        raise InvalidParameter("deepcache_interval", options.interval,
                               "1 (off) for this model: DeepCache splits SD/SDXL UNets only "
                               "(FLUX: first_block_cache)")
    from ..models.optimize import speed_of

    speed = speed_of(model)
    if speed.compiles:
        name = "cuda_graphs" if speed.cuda_graphs else "compile"
        raise InvalidParameter("deepcache_interval", options.interval,
                               f"1 (off) with --optimize {name} (cached steps swap UNet modules, which "
                               "the compiled model would compile again for every request)")
    return DeepCache(unet, options)


# --- infotext -----------------------------------------------------------------------------------

#: Infotext key → DeepCacheOptions field. Interval and branch are always written when it is on;
#: start and end only when set.
INFOTEXT_KEYS = (("DeepCache interval", "interval"), ("DeepCache branch", "branch"),
                 ("DeepCache start", "start"), ("DeepCache end", "end"))


def infotext_entries(options: DeepCacheOptions | None) -> dict[str, int]:
    """The infotext keys that record ``options`` (none when off)."""
    if options is None or options.interval <= 1:
        return {}
    values = {"DeepCache interval": options.interval, "DeepCache branch": options.branch,
              "DeepCache start": options.start or None, "DeepCache end": options.end}
    return {key: value for key, value in values.items() if value is not None}


def options_from_infotext(values: dict[str, str]) -> DeepCacheOptions | None:
    """The DeepCache an infotext records, or None; a value that is not a whole number names its key."""
    if "DeepCache interval" not in values:
        return None
    found: dict[str, int] = {}
    for key, name in INFOTEXT_KEYS:
        if key in values:
            try:
                found[name] = int(values[key])
            except ValueError:
                raise InvalidParameter(key, values[key], "a whole number") from None
    try:
        return DeepCacheOptions(**found)
    except InvalidParameter as exc:
        key = next((k for k, name in INFOTEXT_KEYS if exc.field == f"deepcache_{name}"), "DeepCache interval")
        raise InvalidParameter(key, exc.value, exc.expected) from None
