"""Memory modes (``--vram high|medium|low``): which parts of a model live on the GPU, and when.

* ``high``: everything stays on the device (the fastest; the most memory).
* ``medium``: the text encoders and the VAE rest in host memory and visit the device only while
  they run (prompt encoding, VAE encode, VAE decode); the UNet/transformer stays on the device.
* ``low``: ``medium``, plus the UNet/transformer rests in host memory too and each of its
  top-level blocks (``down_blocks[i]``, ``mid_block``, ``up_blocks[i]``, FLUX's
  ``transformer_blocks[i]`` ...) visits the device only for its own forward, through forward
  pre/post hooks; and the VAE works in tiles, so its activations stay small at any picture size.
  A T5 encoder (FLUX's, 4.76B parameters) is not brought over whole either: its token
  embedding and final norm visit for the prompt encoding, and each ``encoder.block[i]`` only
  for its own forward, through the same hooks.

A visit swaps each weight's ``.data`` for a device copy and swaps the resting copy back
afterwards: nothing is copied back to the host (weights do not change while they run), and a
LoRA merged into the resting copy between visits is what the next visit takes along. The
same swap runs the VAE in another dtype for one call: a half-precision VAE in float32 (SDXL's
VAE overflows in fp16), or whatever the model's ``vae_precision`` asks (:func:`set_vae_precision`).

On a CUDA device the resting weights are pinned (page-locked host memory, :func:`pin_resting`),
so each visit's copy runs at full bus speed and is queued without stopping the host;
``UNDERPAINT_PIN_MEMORY=0`` turns that off (pinned memory cannot be swapped out).

Where the device is the host itself (CPU), every visit is a no-op ``.to()``, but the same code
runs: tests use the CPU as both ``home`` and ``device`` and watch the visits through
``observer`` or a ``transfer`` of their own.

Out of memory: :func:`is_out_of_memory` recognises CUDA's errors; the VAE helpers retry once
in tiles (:func:`run_vae`); an error anywhere else becomes :class:`~underpaint.errors.OutOfMemory`
at the engine, which names the size and batch and suggests a lower mode.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidParameter
from .modes import VAE_PRECISIONS, VRAM_MODES, spoken
from .seamless import is_seamless

log = logging.getLogger(__name__)

#: Picture-side length of a VAE tile in low mode (and in the out-of-memory retry). 512 px is
#: what the SD VAEs were trained at; SDXL's and FLUX's work as well at 512, and a 1024² decode
#: in 512 px tiles keeps the VAE's activations a quarter of the size.
DEFAULT_TILE_PX = 512
#: Fraction of a tile shared with its neighbours, blended across (diffusers' default).
TILE_OVERLAP = 0.25

#: ``transfer(tensor, device, dtype)`` returns the tensor as it should be while its module runs.
Transfer = Callable[[torch.Tensor, torch.device, "torch.dtype | None"], torch.Tensor]
#: ``observer(event, part)``: event "in" or "out"; part "text", "vae", "unet.<block name>" or
#: "text<i>.<block name>" (block by block text encoder ``i`` of ``model.text_encoders``, as "text1.encoder.block.0").
Observer = Callable[[str, str], None]


def _transfer(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    # From page-locked memory the copy is queued on the device's stream and the host goes on; the
    # kernels that use the copy come later on the same stream, so they see it complete.
    non_blocking = tensor.is_pinned()
    if dtype is not None:
        return tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
    return tensor.to(device=device, non_blocking=non_blocking)


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory()


#: ``UNDERPAINT_PIN_MEMORY=0`` keeps offloaded weights in ordinary (swappable) host memory.
PIN_ENV = "UNDERPAINT_PIN_MEMORY"


def pins_by_default(device: torch.device, home: torch.device) -> bool:
    """Offloaded weights are pinned when they rest in host memory for a CUDA device, unless
    :data:`PIN_ENV` is ``0``: copies from page-locked memory are about twice as fast and do not
    stop the host (which queues the next kernels meanwhile)."""
    return device.type == "cuda" and home.type == "cpu" and os.environ.get(PIN_ENV, "1") != "0"


def check_vram(mode: str | None) -> str:
    """The memory mode named, ``high`` for None; anything else is an :class:`InvalidParameter`."""
    mode = "high" if mode in (None, "") else str(mode).lower()
    if mode not in VRAM_MODES:
        raise InvalidParameter("vram", mode, spoken(VRAM_MODES))
    return mode


@dataclass(eq=False)
class Offload:
    """Where a model's parts are kept; installed by :func:`place` as ``model.offload``."""

    mode: str
    #: Where the parts run.
    device: torch.device
    #: Where offloaded parts rest between visits (host memory; the CPU in tests too).
    home: torch.device
    tile_px: int = DEFAULT_TILE_PX
    transfer: Transfer = _transfer
    observer: Observer | None = None
    #: Whether resting weights are pinned (page-locked); ``pinner`` does it (tests watch it).
    pin: bool = False
    pinner: Callable[[torch.Tensor], torch.Tensor] = _pin
    hooks: list = field(default_factory=list, repr=False)
    #: Blocks on a visit now: name → (tensor, resting data) pairs to swap back.
    resident: dict[str, Swapped] = field(default_factory=dict, repr=False)

    @property
    def offloads_encoders(self) -> bool:
        """Text encoders and VAE rest at home (medium and low)."""
        return self.mode in ("medium", "low")

    @property
    def offloads_unet(self) -> bool:
        """The UNet/transformer rests at home and visits block by block (low)."""
        return self.mode == "low"

    def notify(self, event: str, part: str) -> None:
        if self.observer is not None:
            self.observer(event, part)


def offload_of(model: Any) -> Offload | None:
    """The model's memory mode, None for a model never :func:`place`\\ d (everything on its device)."""
    return getattr(model, "offload", None)


# --- placing a model --------------------------------------------------------------------------


def place(model: Any, mode: str = "high", *, device: str | torch.device | None = None,
          home: str | torch.device = "cpu", tile_px: int = DEFAULT_TILE_PX, transfer: Transfer | None = None,
          observer: Observer | None = None, pin: bool | None = None,
          pinner: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Offload:
    """Put ``model``'s parts where ``mode`` keeps them and install the hooks it needs.

    ``device`` defaults to ``model.device``; afterwards ``model.device`` is the device the work
    runs on, whatever rests at ``home``. Placing again replaces the previous mode. ``pin``
    (default :func:`pins_by_default`) puts the resting weights in page-locked host memory.
    """
    mode = check_vram(mode)
    if tile_px < 64 or tile_px % 8:
        raise InvalidParameter("tile_px", tile_px, "a multiple of 8, at least 64")
    release(model)
    device, home = torch.device(device if device is not None else model.device), torch.device(home)
    plan = Offload(mode, device, home, tile_px=tile_px, transfer=transfer or _transfer, observer=observer,
                   pin=pins_by_default(device, home) if pin is None else pin, pinner=pinner or _pin)
    encoders_at = plan.home if plan.offloads_encoders else plan.device
    for module in (*model.text_encoders, model.vae):
        module.to(encoders_at)
    if plan.offloads_unet:
        for index, encoder in enumerate(model.text_encoders):
            for name, block in text_encoder_blocks(encoder):
                _install_hooks(block, plan, f"text{index}.{name}")
        model.unet.to(plan.home)
        _install_block_hooks(model.unet, plan)
    else:
        model.unet.to(plan.device)
    model.offload = plan
    pin_model(model)
    if mode == "low":
        configure_tiling(model.vae, plan.tile_px)
    elif hasattr(model.vae, "disable_tiling"):
        model.vae.disable_tiling()
    model.device = plan.device
    return plan


def pin_model(model: Any) -> int:
    """Pin what the model's memory mode keeps in host memory (again after a transform that made
    new tensors, such as channels-last); 0 where the mode does not pin."""
    plan = offload_of(model)
    if plan is None or not plan.pin:
        return 0
    resting = [*model.text_encoders, model.vae] if plan.offloads_encoders else []
    return pin_resting([*resting, model.unet] if plan.offloads_unet else resting, plan.pinner)


def pin_resting(modules: Iterable[torch.nn.Module], pinner: Callable[[torch.Tensor], torch.Tensor] = _pin) -> int:
    """Move the host-memory tensors of ``modules`` into page-locked memory; returns the bytes
    pinned. When the system refuses (too much locked memory), the rest stay as they are."""
    pinned = 0
    with torch.inference_mode(False), torch.no_grad():
        for tensor in _tensors(modules):
            if tensor.device.type != "cpu" or tensor.is_pinned():
                continue
            try:
                tensor.data = pinner(tensor.data)
            except RuntimeError as exc:
                log.warning("could not pin more host memory after %.1f GB (%s); the rest of the offloaded "
                            "weights stay in ordinary memory", pinned / 1e9, exc)
                break
            pinned += tensor.numel() * tensor.element_size()
    return pinned


def release(model: Any) -> None:
    """Remove a previous :func:`place`'s hooks and return every visiting block home."""
    plan = offload_of(model)
    if plan is None:
        return
    settle(model)
    for handle in plan.hooks:
        handle.remove()
    plan.hooks.clear()


def settle(model: Any) -> None:
    """Send home every block still on a visit (after a forward that raised, e.g. out of memory)."""
    plan = offload_of(model)
    if plan is None:
        return
    for name in list(plan.resident):
        _swap_out(plan.resident.pop(name))
        plan.notify("out", name)


# --- model-level visits: text encoders, VAE ---------------------------------------------------


@contextmanager
def on_device(model: Any, part: str, *, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Bring the text encoders (``part="text"``) or the VAE (``"vae"``) to the device for the
    ``with`` body, in ``dtype`` when given (floating tensors only), and send them back after.

    In high mode without a dtype this does nothing.
    """
    if part == "text":
        modules: tuple = tuple(model.text_encoders)
    elif part == "vae":
        modules = (model.vae,)
    else:
        raise ValueError(f"part must be 'text' or 'vae', not {part!r}")
    plan = offload_of(model)
    visits = plan is not None and plan.offloads_encoders
    if not visits and dtype is None:
        yield
        return
    target = plan.device if visits else _device_of(modules[0], model.device)
    transfer = plan.transfer if plan is not None else _transfer
    own_visits: list[torch.nn.Module] = []
    if part == "text" and visits and plan.offloads_unet and dtype is None:
        # blocks with visits of their own (a T5 encoder's in low mode) stay home until their forward
        own_visits = [block for m in modules for _, block in text_encoder_blocks(m)]
    swapped = _swap_in(modules, target, dtype, transfer, skip=own_visits)
    if plan is not None:
        plan.notify("in", part)
    try:
        yield
    finally:
        _swap_out(swapped)
        if plan is not None:
            plan.notify("out", part)


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device(default)


def _tensors(modules: Iterable[torch.nn.Module], skip: Iterable[torch.nn.Module] = ()) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``, each once (tied weights are one tensor), less
    those of the ``skip`` modules."""
    seen: set[int] = {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
    found = []
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                found.append(tensor)
    return found


#: Casts that float32 undoes exactly (every fp16 and bf16 value is a float32 value): a tensor cast
#: this way on its own device need not keep its original, which is cast back afterwards.
_EXACT_WIDENING = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}

#: What ``_swap_out`` restores: the tensor and either its original data, or (cast on its own device
#: by an exact widening) the dtype to cast it back to.
Swapped = list[tuple[torch.Tensor, "torch.Tensor | torch.dtype"]]


def _swap_in(modules: Iterable[torch.nn.Module], device: torch.device, dtype: torch.dtype | None,
             transfer: Transfer, skip: Iterable[torch.nn.Module] = ()) -> Swapped:
    """Give each tensor (but those of ``skip``) a copy on ``device`` (in ``dtype``); return what to swap back.

    A tensor widened in place (an fp16/bf16 VAE upcast to float32 on the device it lives on) does not
    keep its original: both at once would hold the weights twice at the VAE's peak, where diffusers'
    upcast (``vae.to(float32)`` and back) holds them once. A copy that fails (out of memory half-way)
    sends the ones already made back before raising.
    """
    swapped: Swapped = []
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, even when called while sampling
        try:
            for tensor in _tensors(modules, skip):
                resting = tensor.data
                cast = dtype if tensor.is_floating_point() else None
                visiting = transfer(resting, device, cast)
                if visiting is not resting:
                    tensor.data = visiting
                    widened = (visiting.device == resting.device and (resting.dtype, visiting.dtype) in _EXACT_WIDENING
                               and not resting.is_pinned())
                    swapped.append((tensor, resting.dtype if widened else resting))
                    del resting
        except BaseException:
            _swap_out(swapped)
            raise
    return swapped


def _swap_out(swapped: Swapped) -> None:
    with torch.inference_mode(False), torch.no_grad():
        for tensor, resting in swapped:
            tensor.data = tensor.data.to(resting) if isinstance(resting, torch.dtype) else resting


# --- sequential offload of the UNet/transformer -------------------------------------------------


def offload_blocks(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The top-level children that hold weights, the items of a ModuleList/ModuleDict one by one
    (``down_blocks.0``, ``mid_block``, ``transformer_blocks.7``, ``conv_out`` ...)."""
    blocks = []
    for name, child in root.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            blocks.extend((f"{name}.{sub}", item) for sub, item in child.named_children() if _holds_tensors(item))
        elif _holds_tensors(child):
            blocks.append((name, child))
    return blocks


def _holds_tensors(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def text_encoder_blocks(encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The blocks a text encoder visits the device with one by one in low mode: a T5 stack's
    ``encoder.block[i]`` (transformers' ``T5EncoderModel``); none for other encoders (CLIP)."""
    stack = getattr(encoder, "encoder", None)
    blocks = getattr(stack, "block", None) if isinstance(stack, torch.nn.Module) else None
    if not isinstance(blocks, torch.nn.ModuleList):
        return []
    return [(f"encoder.block.{i}", block) for i, block in enumerate(blocks) if _holds_tensors(block)]


def _install_block_hooks(root: torch.nn.Module, plan: Offload) -> None:
    # Weights of the root itself (none in diffusers' UNet and FLUX transformer) stay on the device.
    for tensor in (*root._parameters.values(), *root._buffers.values()):
        if tensor is not None:
            tensor.data = tensor.data.to(plan.device)
    for name, block in offload_blocks(root):
        _install_hooks(block, plan, f"unet.{name}")


def _install_hooks(block: torch.nn.Module, plan: Offload, part: str) -> None:
    """``block`` visits the device for each of its forwards, as ``part``."""
    plan.hooks.append(block.register_forward_pre_hook(_arrive(plan, part, block)))
    plan.hooks.append(block.register_forward_hook(_leave(plan, part), always_call=True))


def _arrive(plan: Offload, part: str, block: torch.nn.Module) -> Callable:
    def hook(module, args):
        if part not in plan.resident:
            plan.resident[part] = _swap_in((block,), plan.device, None, plan.transfer)
            plan.notify("in", part)

    return hook


def _leave(plan: Offload, part: str) -> Callable:
    def hook(module, args, output):
        swapped = plan.resident.pop(part, None)
        if swapped is not None:
            _swap_out(swapped)
            plan.notify("out", part)

    return hook


# --- VAE: tiling, precision, out-of-memory retry ------------------------------------------------


def configure_tiling(vae: torch.nn.Module, tile_px: int = DEFAULT_TILE_PX) -> None:
    """Turn on diffusers' tiled encode/decode with ``tile_px`` picture tiles (latent tiles 1/8 of
    that for the SD/FLUX VAEs), overlapping by :data:`TILE_OVERLAP`."""
    if not hasattr(vae, "enable_tiling"):
        return
    vae.tile_sample_min_size = int(tile_px)
    vae.tile_latent_min_size = int(tile_px) // vae_scale(vae)
    vae.tile_overlap_factor = TILE_OVERLAP
    vae.enable_tiling()


def vae_scale(vae: torch.nn.Module) -> int:
    """Pixels per latent cell along a side: 2 per downsampling level (8 for every SD/FLUX VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@contextmanager
def tiled(vae: torch.nn.Module, tile_px: int) -> Iterator[None]:
    """Tiling with ``tile_px`` tiles for the ``with`` body; the previous settings after."""
    keys = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    before = {k: getattr(vae, k) for k in keys if hasattr(vae, k)}
    configure_tiling(vae, tile_px)
    try:
        yield
    finally:
        for key, value in before.items():
            setattr(vae, key, value)


#: The dtypes of the ``vae_precision`` values (``--vae-precision``, :data:`.modes.VAE_PRECISIONS`)
#: other than ``auto``. Each value means:
#:
#: * ``auto``: :func:`vae_compute_dtype`'s rule (a half-precision VAE with ``force_upcast`` in
#:   bfloat16 on a GPU with fast bfloat16, as ComfyUI, else in float32, as diffusers; otherwise the
#:   stored dtype), and an fp16 decode with NaNs computed again in float32.
#: * ``fp32``: always float32 (AUTOMATIC1111's ``--no-half-vae``).
#: * ``fp16``: half precision even for a ``force_upcast`` VAE (faster; SDXL's may overflow): an
#:   encode or decode whose result has NaN or inf is computed again in float32, as AUTOMATIC1111
#:   reverts the VAE to 32 bits when it produces NaNs.
#: * ``bf16``: bfloat16, which has float32's range and so does not overflow, at a coarser
#:   rounding (ComfyUI's ``--bf16-vae``); refused on a CUDA device without bfloat16.
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_vae_precision(precision: str | None, device: str | torch.device | None = None) -> str:
    """The VAE precision named (``auto`` for None); an unknown name, or ``bf16`` on a CUDA device
    without bfloat16 support (``torch.cuda.is_bf16_supported()``), is an :class:`InvalidParameter`.

    The CPU runs bfloat16 (slowly, but correctly), so it is allowed there; so is MPS.
    """
    precision = "auto" if precision in (None, "") else str(precision).lower()
    if precision not in VAE_PRECISIONS:
        raise InvalidParameter("vae_precision", precision, spoken(VAE_PRECISIONS))
    if precision == "bf16" and device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InvalidParameter("vae_precision", precision,
                                   f"auto, fp32 or fp16 on {device}, which does not support bfloat16")
    return precision


def vae_precision_of(model: Any) -> str:
    """The model's ``vae_precision``: ``auto`` where none was set."""
    return getattr(model, "vae_precision", None) or "auto"


def set_vae_precision(model: Any, precision: str | None) -> str:
    """Make every later VAE call of ``model`` (encode, decode, previews, hires) run at
    ``precision`` (:data:`.modes.VAE_PRECISIONS`), checked against the device the VAE runs on.

    Nothing is converted here: the weights stay as stored and each call takes a copy in the
    precision's dtype along (:func:`run_vae`), so the setting can change between requests.
    """
    precision = check_vae_precision(precision, model.device)
    model.vae_precision = precision
    return precision


def vae_compute_dtype(stored: torch.dtype, force_upcast: bool, precision: str = "auto", *,
                      fast_bf16: bool = False) -> torch.dtype:
    """The dtype a VAE stored in ``stored`` runs in at ``precision`` (:data:`.modes.VAE_PRECISIONS`).

    ``auto``: a half-precision VAE whose config says it overflows in fp16 (``force_upcast``, set
    for SDXL's and FLUX's) runs in bfloat16 where the device computes it natively (``fast_bf16``:
    NVIDIA Ampere and later, as ComfyUI does by default; bfloat16 has float32's range, so it does
    not overflow, at a coarser rounding), else in float32 (as diffusers); any other VAE as stored. A
    VAE known to be fp16-safe (``force_upcast`` False, as madebyollin's sdxl-vae-fp16-fix) runs in
    fp16. Any other precision is its dtype, whatever is stored.
    """
    if precision != "auto":
        return _PRECISION_DTYPES[precision]
    if stored == torch.float16 and force_upcast:
        return torch.bfloat16 if fast_bf16 else torch.float32
    return stored


def fast_bf16(device: str | torch.device | None) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU of compute capability 8.0 or later
    (Ampere, Ada, Hopper, Blackwell). Older GPUs emulate it, and CPUs run it slower than float32."""
    if device is None:
        return False
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def model_vae_dtype(model: Any) -> torch.dtype:
    """:func:`vae_compute_dtype` for ``model.vae`` at the model's ``vae_precision`` on its device."""
    stored = next(model.vae.parameters()).dtype
    return vae_compute_dtype(stored, bool(getattr(model.vae.config, "force_upcast", False)), vae_precision_of(model),
                             fast_bf16=fast_bf16(getattr(model, "device", None)))


def run_vae(model: Any, call: Callable[[torch.nn.Module, torch.device, torch.dtype], torch.Tensor], *,
            nan_check: bool = False, what: str = "call") -> torch.Tensor:
    """``call(vae, device, dtype)`` with the VAE on the device in its compute dtype (:func:`model_vae_dtype`).

    Out of memory: the cache is emptied and the call retried once in tiles (half the mode's tile
    size when it already tiles). Overflow: at ``vae_precision`` ``fp16`` a result with NaN or
    inf is computed again in float32; at ``auto``, with ``nan_check``, a half-precision result
    with NaNs is. ``what`` ("encode", "decode") names the call in the log line that says so.
    """
    precision = vae_precision_of(model)
    dtype = model_vae_dtype(model)
    out = _vae_with_retry(model, call, dtype)
    if dtype == torch.float16 and _overflowed(out, precision, nan_check):
        log.info("the VAE %s in float16 gave NaN or inf values (an overflow): computed again in float32", what)
        del out  # the float32 call may need the memory
        out = _vae_with_retry(model, call, torch.float32)
    return out


def _overflowed(out: torch.Tensor, precision: str, nan_check: bool) -> bool:
    """Whether a half-precision result is to be computed again in float32 (see :func:`run_vae`)."""
    if precision == "fp16":
        return not bool(torch.isfinite(out).all())
    return precision == "auto" and nan_check and bool(torch.isnan(out).any())


def _vae_with_retry(model: Any, call: Callable, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_vae_once`, and once more in tiles after an out-of-memory error."""
    try:
        out = _vae_once(model, call, dtype)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
        if not is_out_of_memory(exc) or is_seamless(model):  # a tile would wrap onto itself (models/seamless.py)
            raise
        out = None
    if out is None:  # outside the except block: the failed call's tensors are freed first
        settle(model)
        free_cache()
        plan = offload_of(model)
        tile = plan.tile_px if plan is not None else DEFAULT_TILE_PX
        if getattr(model.vae, "use_tiling", False):
            tile = max(64, int(getattr(model.vae, "tile_sample_min_size", tile)) // 2 // 8 * 8)
        with tiled(model.vae, tile):
            out = _vae_once(model, call, dtype)
    return out


def _vae_once(model: Any, call: Callable, dtype: torch.dtype) -> torch.Tensor:
    with on_device(model, "vae", dtype=dtype if dtype != next(model.vae.parameters()).dtype else None):
        with torch.inference_mode():
            return call(model.vae, model.device, dtype)


# --- out of memory ------------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error (``torch.cuda.OutOfMemoryError``, or a RuntimeError saying so)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cache() -> None:
    """Give cached, unused GPU memory back (after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
