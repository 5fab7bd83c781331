"""Speed switches (``--optimize``, ``--attention``): transforms of a loaded model that change how
fast it runs, not what it computes (all but ``fp8``, a speed/quality trade-off).

* ``channels_last``: the UNet's and the VAE's weights in NHWC order, which cuDNN's fp16/bf16
  convolutions prefer on recent GPUs (the pictures are the same to within rounding).
* ``fused_qkv``: each self-attention's query, key and value projections as one matrix product
  (cross-attention: key and value), through diffusers' fused projections. The separate weights
  stay where they are, because LoRAs are merged into them; :func:`weights_changed` copies them
  into the fused ones after every merge and restore.
* ``fp8`` (**lossy**): the UNet's/transformer's linear layers multiply in fp8 on GPUs with fp8
  tensor cores (compute capability 8.9 or newer), weights quantized per output channel and
  activations per token (:mod:`.fp8`); the full-precision weights wait in host memory for
  :func:`undo` and for LoRA merges, after which :func:`weights_changed` quantizes them again.
  Allowed on the CPU, where PyTorch emulates it slowly, so that it can be checked without a GPU.
  Applied after ``fused_qkv`` (the fused projections are converted too).
* ``compile``: ``torch.compile`` of the ``forward`` of the UNet (FLUX: the transformer) and of
  the VAE's encoder and decoder, in place, so every name, hook and weight stays where the rest
  of the engine finds it. Compiled kernels are cached on disk (:func:`compile_cache_dir`),
  so a restart with the same architecture, dtype and picture sizes skips code generation; weights
  are inputs of the compiled graph, so a LoRA merged in place or another checkpoint of the same
  architecture reuses it.
* ``cuda_graphs``: ``compile`` in its ``reduce-overhead`` mode for the UNet/transformer: each
  denoising step is replayed as one recorded CUDA graph, without a kernel launch per layer
  (CUDA only; weights changed in place by a LoRA are read by the replay, since the graph holds
  their addresses, not their values).
* ``aot``: the UNet's forward exported and compiled ahead of time by AOTInductor into a package
  on disk (:mod:`.aot`), one per input signature, without its weights: a restart loads it instead
  of tracing, and the model's own parameters are bound to it (a LoRA merged in place is what it
  reads). Calls that do not match a package (ControlNet residuals, hooks, other arguments) run
  eager, and so does a model whose export fails (logged once). SD/SDXL UNets and FLUX
  transformers; the VAE stays eager.
* ``--attention auto|flash|efficient|cudnn|math``: the scaled-dot-product attention kernel the
  UNet/transformer uses (``auto`` lets PyTorch choose per shape); chosen around each model call
  with :func:`attention_for`, so it also holds while ``compile`` traces.

None is on by default: each is a measured choice (docs/performance.md). They apply to the model
that generates; ControlNets, adapters and the text encoders are left as loaded. ``fused_qkv`` is
refused below ``--vram high`` (its extra weights would travel with every offloaded block), and
``compile``/``cuda_graphs`` with ``--vram low`` (the block-by-block hooks move weights inside
the compiled region), ``fp8`` on a CUDA GPU below compute capability 8.9 (no fp8 tensor cores)
and on devices other than CUDA and the CPU. ``aot`` is refused with ``compile``/``cuda_graphs``
(two compilers for one UNet), with ``fp8``, with ``--vram low`` (weights move inside the
compiled model) and on devices other than CUDA and the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParameter

#: ``--optimize`` names, in the order they are applied.
OPTIMIZATIONS = ("channels_last", "fused_qkv", "fp8", "compile", "cuda_graphs", "aot")
#: Switches that change the picture (the others are checked equal within rounding).
LOSSY = ("fp8",)
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
_CUDA_ONLY_ATTENTION = ("efficient", "cudnn")

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SpeedOptions:
    """Which switches are on. ``compile_backend``/``compile_mode`` are passed to ``torch.compile``
    (tests use the ``aot_eager`` backend, which needs no C++ or Triton compiler). ``aot_build``
    off: ``aot`` uses packages already on disk and runs other input shapes eager instead of
    compiling new packages."""

    channels_last: bool = False
    fused_qkv: bool = False
    fp8: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    aot: bool = False
    attention: str = "auto"
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    aot_build: bool = True

    @classmethod
    def parse(cls, names: str | Iterable[str] | None = None, *, attention: str | None = None,
              **extra: Any) -> "SpeedOptions":
        """From ``--optimize`` (comma-separated names, or ``none``) and ``--attention``."""
        if names is None:
            items: list[str] = []
        elif isinstance(names, str):
            items = [n.strip().lower().replace("-", "_") for n in names.split(",") if n.strip()]
        else:
            items = [str(n).strip().lower().replace("-", "_") for n in names]
        items = [n for n in items if n != "none"]
        unknown = [n for n in items if n not in OPTIMIZATIONS]
        if unknown:
            raise InvalidParameter("optimize", ",".join(unknown), "a comma-separated list of " + ", ".join(OPTIMIZATIONS)
                                   + " (or none)")
        backend = "auto" if attention in (None, "") else str(attention).lower()
        if backend not in ATTENTION_BACKENDS:
            raise InvalidParameter("attention", attention, ", ".join(ATTENTION_BACKENDS))
        return cls(**{name: True for name in items}, attention=backend, **extra)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in OPTIMIZATIONS if getattr(self, name))

    @property
    def compiles(self) -> bool:
        return self.compile or self.cuda_graphs

    def describe(self) -> str:
        """``channels_last,compile`` plus ``attention=flash`` when not auto; ``none`` when nothing is on."""
        parts = list(self.names) + ([f"attention={self.attention}"] if self.attention != "auto" else [])
        return ",".join(parts) or "none"


def speed_of(model: Any) -> SpeedOptions:
    """The switches applied to ``model`` (all off for a model never optimized)."""
    return getattr(model, "speed", None) or SpeedOptions()


def check(options: SpeedOptions, *, device: torch.device, vram: str = "high") -> None:
    """Refuse a combination that cannot run here, naming the switch and what it needs."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if options.cuda_graphs and not cuda:
        raise InvalidParameter("optimize", "cuda_graphs", f"a CUDA device (this model runs on {device})")
    if options.attention in _CUDA_ONLY_ATTENTION and not cuda:
        raise InvalidParameter("attention", options.attention, f"auto, flash or math on {device} "
                               f"({options.attention} kernels exist for CUDA only)")
    if options.fused_qkv and vram != "high":
        raise InvalidParameter("optimize", "fused_qkv", "--vram high (the fused weights would be offloaded too)")
    if options.fp8 and (problem := _fp8_problem(device)) is not None:
        raise InvalidParameter("optimize", "fp8", problem)
    if options.compiles and vram == "low":
        name = "cuda_graphs" if options.cuda_graphs else "compile"
        raise InvalidParameter("optimize", name, "--vram high or medium (low moves weights inside the compiled model)")
    if options.aot:
        _check_aot(options, device=torch.device(device), vram=vram)


def _check_aot(options: SpeedOptions, *, device: torch.device, vram: str) -> None:
    if options.compiles:
        other = "cuda_graphs" if options.cuda_graphs else "compile"
        raise InvalidParameter("optimize", f"aot,{other}", f"one of aot and {other} (both compile the UNet)")
    if options.fp8:
        raise InvalidParameter("optimize", "aot,fp8", "aot without fp8 (fp8 layers are not exported)")
    if vram == "low":
        raise InvalidParameter("optimize", "aot", "--vram high or medium (low moves weights inside the compiled model)")
    if device.type not in ("cpu", "cuda"):
        raise InvalidParameter("optimize", "aot", f"a CUDA device or the CPU (this model runs on {device})")


def apply(model: Any, options: SpeedOptions) -> SpeedOptions:
    """Switch ``model`` (a LoadedModel, placed) to ``options``, undoing what was on before."""
    import torch

    from .offload import offload_of, pin_model

    plan = offload_of(model)
    check(options, device=model.device, vram=plan.mode if plan is not None else "high")
    undo(model)
    model.speed = options
    if options.channels_last:
        for module in _conv_modules(model):
            module.to(memory_format=torch.channels_last)
        pin_model(model)  # reordered weights are new tensors: pinned again where the mode pins
    if options.fused_qkv:
        _fuse(model.unet)
    if options.fp8:
        from . import fp8

        fp8.convert(model.unet, device=model.device, dtype=model.dtype)
        pin_model(model)  # new host-memory tensors in --vram low
    if options.compiles:
        compile_cache_dir()
        unet_mode = options.compile_mode or ("reduce-overhead" if options.cuda_graphs else None)
        _compile_forward(model.unet, backend=options.compile_backend, mode=unet_mode)
        for part in _vae_parts(model):
            # The VAE runs once or twice per request, often at another size: no CUDA graphs for it.
            _compile_forward(part, backend=options.compile_backend,
                             mode=None if options.compile_mode == "reduce-overhead" else options.compile_mode)
    if options.aot:
        _install_aot(model, options)
    return options


def undo(model: Any) -> None:
    """Back to the model as loaded (compiled code dropped, weights contiguous, projections unfused)."""
    import torch

    options = getattr(model, "speed", None)
    if options is None:
        return
    if options.compiles:
        for module in (model.unet, *_vae_parts(model)):
            module.__dict__.pop("forward", None)
    if options.aot:
        from .aot import uninstall

        uninstall(model.unet)
    if options.fp8:
        from . import fp8

        fp8.restore(model.unet)
    if options.fused_qkv:
        _unfuse(model.unet)
    if options.channels_last:
        for module in _conv_modules(model):
            module.to(memory_format=torch.contiguous_format)
        from .offload import pin_model

        pin_model(model)
    model.speed = None


def weights_changed(model: Any) -> None:
    """Call after weights were written in place (a LoRA merged or restored): refresh what is derived
    from them (the fused projections, then the fp8 copies, which may be of fused projections)."""
    speed = speed_of(model)
    if speed.fused_qkv:
        _refresh_fused(model.unet)
    if speed.fp8:
        from . import fp8

        fp8.refresh(model.unet, device=model.device)
    if speed.aot and hasattr(forward := model.unet.__dict__.get("forward"), "weights_changed"):
        forward.weights_changed()


def attention_for(model: Any):
    """The context for one call of the model's UNet/transformer: only the chosen SDPA kernel
    enabled, or nothing at all for ``auto``."""
    backend = speed_of(model).attention
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    return sdpa_kernel([kernel])


def begin_call(model: Any) -> None:
    """Before each UNet/transformer call. With ``cuda_graphs``: a new step begins, so the recorded
    graph is replayed into the same output buffer (without this, an earlier call's output still
    referenced would make the CUDA-graph runtime record another graph for the next call)."""
    if speed_of(model).cuda_graphs:
        import torch

        torch.compiler.cudagraph_mark_step_begin()


def owned(out: torch.Tensor, model: Any) -> torch.Tensor:
    """The model's output in float32, as a tensor of its own: with ``cuda_graphs`` the output is
    the graph's buffer, which the next step overwrites, while samplers keep earlier steps' results."""
    import torch

    if out.dtype != torch.float32:
        return out.float()
    return out.clone() if speed_of(model).cuda_graphs else out


def compile_cache_dir() -> Path:
    """Where compiled kernels persist between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/underpaint/torch-compile`` (instead of a temporary folder that a reboot empties)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given and not _is_torch_default(given):  # importing torch may have filled in its own default
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "underpaint" / "torch-compile"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def is_compiled(module: Any) -> bool:
    return "forward" in getattr(module, "__dict__", {})


@contextmanager
def eager(*modules: Any) -> Iterator[None]:
    """``modules`` run their own, uncompiled ``forward`` inside the ``with`` block; the compiled one
    (``compile``, ``cuda_graphs``, ``aot``) is put back after. For request features that hook a module or
    change its layers: compiled code would not see them (``torch._dynamo.config.skip_nnmodule_hook_guards``)."""
    set_aside = [(m, m.__dict__.pop("forward")) for m in modules if is_compiled(m)]
    try:
        yield
    finally:
        for module, forward in set_aside:
            module.forward = forward


def _compile_forward(module: torch.nn.Module, **options: Any) -> None:
    """Compile the module's ``forward`` in place. Unlike ``module.compile()``, hooks registered on
    the module itself (timing, offload) run outside the compiled region and cannot break it."""
    import torch

    module.forward = torch.compile(module.forward, **options)


def _install_aot(model: Any, options: SpeedOptions) -> None:
    """Give the UNet its package-running forward (:mod:`.aot`); the flags that change the
    compiled code are part of each package's key."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from .aot import install

    if not isinstance(model.unet, (UNet2DConditionModel, FluxTransformer2DModel)):
        raise InvalidParameter("optimize", "aot", f"an SD/SDXL UNet or a FLUX transformer (this model's is a "
                               f"{type(model.unet).__name__}; use compile)")
    flags = {"channels_last": options.channels_last, "fused_qkv": options.fused_qkv, "attention": options.attention}
    install(model.unet, flags=flags, build_new=options.aot_build)


def _fp8_problem(device: Any) -> str | None:
    from .fp8 import capability_problem

    return capability_problem(device)


def _is_torch_default(path: str) -> bool:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: trust the variable
        return False
    return os.path.abspath(path) == os.path.abspath(default_cache_dir())


# --- parts ------------------------------------------------------------------------------------


def _vae_parts(model: Any) -> list[torch.nn.Module]:
    vae = model.vae
    return [part for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)) if part is not None]


def _conv_modules(model: Any) -> list[torch.nn.Module]:
    """The modules whose 4-D weights channels-last reorders (FLUX's transformer has none: only its VAE)."""
    return [model.unet, model.vae]


# --- fused projections ------------------------------------------------------------------------

_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
          "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _fusable(module: torch.nn.Module) -> bool:
    """An attention layer whose projections are plain linear layers (not compressed fp8/GGUF ones)."""
    import torch

    if not hasattr(module, "fuse_projections") or not getattr(module, "_supports_qkv_fusion", True):
        return False
    names = ("to_k", "to_v") if getattr(module, "is_cross_attention", False) else ("to_q", "to_k", "to_v")
    return all(type(getattr(module, n, None)) is torch.nn.Linear for n in names)


def _fuse(root: torch.nn.Module) -> None:
    import torch
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    layers = [m for m in root.modules() if _fusable(m)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, Attention):  # UNet attention: fused weights plus the fused processor
                layer.original_processor = layer.processor
                layer.fuse_projections(fuse=True)
                layer.set_processor(FusedAttnProcessor2_0())
            else:  # FLUX's attention reads the flag in its own processor
                layer.fuse_projections()


def _unfuse(root: torch.nn.Module) -> None:
    for layer in root.modules():
        if not getattr(layer, "fused_projections", False):
            continue
        original = getattr(layer, "original_processor", None)
        if original is not None:
            layer.set_processor(original)
            del layer.original_processor
        for name in _FUSED:
            if hasattr(layer, name):
                delattr(layer, name)
        layer.fused_projections = False


def _refresh_fused(root: torch.nn.Module) -> None:
    """Copy the separate projections into the fused ones, in place (compiled code and CUDA graphs
    keep pointing at the same storage)."""
    import torch

    with torch.no_grad():
        for layer in root.modules():
            if not getattr(layer, "fused_projections", False):
                continue
            for fused_name, parts in _FUSED.items():
                fused = getattr(layer, fused_name, None)
                if fused is None:
                    continue
                sources = [getattr(layer, p) for p in parts]
                fused.weight.copy_(torch.cat([s.weight for s in sources]))
                if fused.bias is not None:
                    fused.bias.copy_(torch.cat([s.bias for s in sources]))
