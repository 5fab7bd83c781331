"""Ahead-of-time compiled UNet and FLUX transformer packages (``--optimize aot``): a restart loads
compiled code from disk instead of tracing the model again. "The UNet" below stands for either.

``compile`` keeps its generated kernels on disk, but every new process still traces the UNet
with Dynamo and AOTAutograd before it finds them (tens of seconds for SD 1.5 on a CPU; see
docs/performance.md). Here the UNet's forward is exported once per input signature
(``torch.export``, non-strict), compiled by AOTInductor into a ``.pt2`` package, and stored in
:func:`cache_dir`. A later process loads the package (a shared library: no Python is traced)
and binds the model's own parameters to it as *user-managed constants*: the package holds no
weights (``aot_inductor.package_constants_in_so=False``), only pointers to the tensors of the
module it runs for. So:

* any checkpoint of the same architecture, dtype and layout reuses a package;
* a LoRA merged in place (or fused projections refreshed in place) is what the compiled code
  reads at the next call, exactly as eager;
* tensors that were replaced (``.data`` swapped, moved between devices) are noticed before the
  call (their addresses changed) and bound again, after their shapes, strides and dtypes are
  checked against the package's record.

A package is keyed by everything its code depends on (:func:`package_key`): the UNet class and
config, weight dtype and memory layout flags (``channels_last``, ``fused_qkv``), the attention
kernel choice, device type and capability (CPU: vector ISA), the input shapes and dtypes, and
the torch, diffusers and underpaint versions. Inductor is told to keep every weight a constant
it reads (:data:`INDUCTOR_CONFIGS`), and a package whose code still holds a weight's values is
refused when it is built. Files are written under a temporary name and
renamed; a JSON record beside each package holds its key and a SHA-256 of the package, and a
package whose record is missing, differs, or whose bytes do not match is not used (it is
deleted and built again, or the call runs eager when building is off).

Only calls that match a package's signature use it: ``sample``, a tensor ``timestep``,
``encoder_hidden_states`` (plus SDXL's ``added_cond_kwargs`` ``text_embeds``/``time_ids``) with
no ControlNet/T2I residuals, no attention mask or cross-attention kwargs, no gradient, and no
hooks on the UNet itself (DeepCache, token merging). For FLUX: ``hidden_states``,
``encoder_hidden_states``, ``pooled_projections``, ``timestep``, ``img_ids``, ``txt_ids`` and
``guidance`` (dev; absent for schnell) as tensors, with no ControlNet samples or attention kwargs
(First Block Cache swaps the transformer's blocks, which an installed package would not see, so
the engine refuses it with compiled models). Anything else runs the model eager. A
signature seen for the first time is looked up on disk and, if absent, exported and compiled in
that call (like ``compile``'s first call at a new size; minutes for a real UNet), unless
``SpeedOptions.aot_build`` is off, in which case such calls run eager. A signature whose export
or compilation fails is logged once and runs eager from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Bumped when the record layout or the calling convention changes.
FORMAT = 2
#: What happened, for tests and benchmarks: "built", "loaded", "rejected", "compiled_calls", "eager_calls".
stats: Counter[str] = Counter()

_TENSOR_ARGS = ("sample", "timestep", "encoder_hidden_states")
#: UNet keyword arguments that must be absent (None) for a call to use a package.
_MUST_BE_NONE = ("class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
                 "down_block_additional_residuals", "mid_block_additional_residual",
                 "down_intrablock_additional_residuals", "encoder_attention_mask")
_PREFIX = "unet."
#: Weights stay outside the package, and no weight's value may end up in the code: inductor
#: otherwise inlines 1-D tensors of up to 8 values (``conv_out.bias``) and folds uniform ones
#: (a norm's weight of ones) into constants, which another checkpoint or a LoRA would not change.
INDUCTOR_CONFIGS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False,
                                    "always_keep_tensor_constants": True,
                                    "joint_graph_constant_folding": False, "freezing": False}


def cache_dir() -> Path:
    """``$UNDERPAINT_AOT_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/underpaint/aot``
    (``~/.cache/underpaint/aot`` when that is unset)."""
    if given := os.environ.get("UNDERPAINT_AOT_CACHE_DIR"):
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "underpaint" / "aot"


# --- signatures and keys ------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """The tensors a package takes, in order: (name, shape, dtype) each, and the device type."""

    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    device: str

    def describe(self) -> list[list[Any]]:
        return [[name, list(shape), dtype] for name, shape, dtype in self.inputs]


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], must_be_none: tuple[str, ...]) -> dict | None:
    """The call's arguments by name (``args`` in the order of ``names``), without ``return_dict``
    and the ones that must be None; None when one is given twice, too many are positional, or one
    that must be None is not."""
    if len(args) > len(names):
        return None
    given = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in given:
            return None
        given[name] = value
    if any(given.pop(name, None) is not None for name in must_be_none):
        return None
    given.pop("return_dict", None)
    return given


def call_inputs(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]] | None:
    """A UNet call's tensors in package order, or None when the call needs the eager UNet."""
    given = _arguments(args, kwargs, _TENSOR_ARGS, _MUST_BE_NONE)
    if given is None:
        return None
    added = given.pop("added_cond_kwargs", None)
    tensors = [(name, given.pop(name, None)) for name in _TENSOR_ARGS]
    if given or any(not isinstance(t, torch.Tensor) for _, t in tensors):
        return None  # an argument this module does not know about, or a Python-number timestep
    if added:
        if set(added) != {"text_embeds", "time_ids"}:
            return None
        tensors += [(name, added[name]) for name in ("text_embeds", "time_ids")]
        if not all(isinstance(t, torch.Tensor) for _, t in tensors[-2:]):
            return None
    device = tensors[0][1].device
    if any(t.device != device for _, t in tensors):
        return None
    return tensors


_FLUX_TENSORS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance")
_FLUX_MUST_BE_NONE = ("joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples")


def flux_call_inputs(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]] | None:
    """A FLUX transformer call's tensors in package order (``guidance`` left out when None), or None
    when the call needs the eager transformer."""
    given = _arguments(args, kwargs, _FLUX_TENSORS, _FLUX_MUST_BE_NONE)
    if given is None or given.pop("controlnet_blocks_repeat", False):
        return None
    if given.get("guidance", 0) is None:
        del given["guidance"]
    if any(name not in given for name in _FLUX_TENSORS[:-1]):  # all but guidance are needed
        return None
    tensors = [(name, given.pop(name)) for name in _FLUX_TENSORS if name in given]
    if given or any(not isinstance(t, torch.Tensor) for _, t in tensors):
        return None
    device = tensors[0][1].device
    if any(t.device != device for _, t in tensors):
        return None
    return tensors


def signature_of(tensors: list[tuple[str, torch.Tensor]]) -> Signature:
    return Signature(tuple((n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors),
                     tensors[0][1].device.type)


def device_capability(device: torch.device) -> str:
    """What compiled code for ``device`` depends on beyond its type."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    if device.type == "cpu":
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return f"cpu-{pick_vec_isa()}"
    return device.type


def package_key(unet: torch.nn.Module, signature: Signature, flags: dict[str, Any], device: torch.device) -> dict:
    """Everything a package's code depends on (its file name is a hash of this)."""
    import diffusers

    from .. import __version__

    config = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not str(k).startswith("_")}
    first = next(unet.parameters())
    return {"format": FORMAT, "class": f"{type(unet).__module__}.{type(unet).__qualname__}",
            "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "weights_dtype": str(first.dtype).removeprefix("torch."), "flags": dict(sorted(flags.items())),
            "device": signature.device, "capability": device_capability(device), "inputs": signature.describe(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "underpaint": __version__}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


# --- the exported function ----------------------------------------------------------------------


class _Exported(torch.nn.Module):
    """The UNet's class forward with plain tensor arguments (the instance's own ``forward`` is the
    :class:`AotForward` that calls this)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                       added_cond_kwargs=added, return_dict=False)[0]


class _FluxExported(torch.nn.Module):
    """The FLUX transformer's class forward with plain tensor arguments (``guidance`` None: schnell)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.unet = transformer  # the same prefix as the UNet's: one naming of the weights

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        return type(self.unet).forward(self.unet, hidden_states=hidden_states,
                                       encoder_hidden_states=encoder_hidden_states,
                                       pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                       txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def _is_flux(module: torch.nn.Module) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(module, FluxTransformer2DModel)


def _named_tensors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = {_PREFIX + n: p for n, p in unet.named_parameters()}
    named.update({_PREFIX + n: b for n, b in unet.named_buffers()})
    return named


def _layout(t: torch.Tensor) -> list[Any]:
    return [list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch.")]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(unet: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]], key: dict, folder: Path) -> Path:
    """Export ``unet`` for these inputs, compile it into ``folder/<hash>.pt2`` without its weights,
    and write the record beside it; returns the package path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = key_hash(key)
    package = folder / f"{name}.pt2"
    with torch.inference_mode(False), torch.no_grad():
        # Fresh tensors: the call may come from inside inference mode, whose tensors export refuses.
        example = tuple(t.detach().clone() for _, t in tensors)
        wrapper = _FluxExported(unet) if _is_flux(unet) else _Exported(unet)
        program = torch.export.export(wrapper, example, strict=False)
        log.info("aot: exported the %s for %s; compiling", _what(unet), key["inputs"])
        tmp = folder / f".{name}.{os.getpid()}.tmp.pt2"
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=INDUCTOR_CONFIGS)
            fqns = list(torch._inductor.aoti_load_package(str(tmp)).get_constant_fqns())
            named = _named_tensors(unet)
            used = {*program.graph_signature.parameters, *program.graph_signature.buffers}
            if baked := sorted(used - set(fqns)):
                raise RuntimeError(f"the compiled code holds the values of {', '.join(baked[:5])} instead of "
                                   "reading them (another checkpoint would run with these)")
            # Constants the export lifted that are not the module's own weights travel in a small file.
            extra = {f: _lifted(program, f).contiguous() for f in fqns if f not in named}
            extra_file = folder / f"{name}.extra.safetensors"
            if extra:
                save_file(extra, str(extra_file.with_name(f".{extra_file.name}.{os.getpid()}.tmp")))
                os.replace(extra_file.with_name(f".{extra_file.name}.{os.getpid()}.tmp"), extra_file)
            os.replace(tmp, package)
        finally:
            tmp.unlink(missing_ok=True)
    record = {"key": key, "sha256": _sha256(package), "constants": {f: _layout(named[f]) for f in fqns if f in named},
              "extra": sorted(extra), "extra_sha256": _sha256(extra_file) if extra else None}
    _atomic_write(folder / f"{name}.json", json.dumps(record, indent=1).encode())
    stats["built"] += 1
    log.info("aot: compiled the %s for %s into %s", _what(unet), key["inputs"], package)
    return package


def _lifted(program: Any, fqn: str) -> torch.Tensor:
    for table in (program.constants, program.state_dict):
        if fqn in table:
            return table[fqn].detach()
    raise RuntimeError(f"the compiled UNet needs a constant {fqn!r} that neither the module nor the export holds")


def _what(module: torch.nn.Module) -> str:
    return "FLUX transformer" if _is_flux(module) else "UNet"


class PackageRejected(Exception):
    """A package on disk that must not be used (why is the message)."""


@dataclass
class Loaded:
    """A package bound to one module's tensors."""

    runner: Any
    record: dict
    extra: dict[str, torch.Tensor]
    bound: list[torch.Tensor] = field(default_factory=list)
    addresses: tuple[int, ...] = ()

    def bind(self, unet: torch.nn.Module) -> None:
        """Give the package the module's current tensors, after checking their layout."""
        named = _named_tensors(unet)
        tensors: dict[str, torch.Tensor] = {}
        for fqn, layout in self.record["constants"].items():
            t = named.get(fqn)
            if t is None or _layout(t) != layout:
                raise PackageRejected(f"weight {fqn} is {None if t is None else _layout(t)}, the package "
                                      f"was compiled for {layout}")
            tensors[fqn] = t.detach()
        tensors.update(self.extra)
        self.runner.load_constants(tensors, check_full_update=True, user_managed=True)
        log.debug("aot: bound %d tensors to the package", len(tensors))
        self.bound = [named[f] for f in self.record["constants"]]
        self.addresses = tuple(t.data_ptr() for t in self.bound)

    def ensure_bound(self, unet: torch.nn.Module) -> None:
        """Bind again when a bound tensor's storage moved (``.data`` swapped, ``.to()``); a
        parameter replaced by another object is caught by :meth:`AotForward.weights_changed`."""
        if not self.bound or tuple(t.data_ptr() for t in self.bound) != self.addresses:
            self.bind(unet)


def load(folder: Path, key: dict) -> Loaded | None:
    """The package for ``key`` from ``folder``; None when there is none. A package that is there
    but unusable raises :class:`PackageRejected`."""
    from safetensors.torch import load_file

    name = key_hash(key)
    package, record_file = folder / f"{name}.pt2", folder / f"{name}.json"
    if not package.exists() and not record_file.exists():
        return None
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as exc:
        raise PackageRejected(f"its record {record_file} is unreadable ({exc})") from exc
    if record.get("key") != key:
        raise PackageRejected(f"{record_file} was written for another model or torch version")
    if not package.exists() or _sha256(package) != record.get("sha256"):
        raise PackageRejected(f"{package} is missing or does not match its record (truncated or changed)")
    extra: dict[str, torch.Tensor] = {}
    if record.get("extra"):
        extra_file = folder / f"{name}.extra.safetensors"
        if not extra_file.exists() or _sha256(extra_file) != record.get("extra_sha256"):
            raise PackageRejected(f"{extra_file} is missing or does not match its record")
        extra = load_file(str(extra_file), device=key["device"] if key["device"] != "cpu" else "cpu")
    try:
        runner = torch._inductor.aoti_load_package(str(package))
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and others for a bad archive
        raise PackageRejected(f"{package} does not load ({exc})") from exc
    if sorted(runner.get_constant_fqns()) != sorted([*record["constants"], *record.get("extra", [])]):
        raise PackageRejected(f"{package} asks for other weights than its record lists")
    stats["loaded"] += 1
    log.info("aot: loaded %s", package)
    return Loaded(runner, record, extra)


def discard(folder: Path, key: dict) -> None:
    name = key_hash(key)
    for suffix in (".pt2", ".json", ".extra.safetensors"):
        (folder / f"{name}{suffix}").unlink(missing_ok=True)


# --- the module's forward -----------------------------------------------------------------------


class AotForward:
    """Installed as ``unet.forward``: runs a compiled package for calls that match one, the UNet's
    class forward for every other call."""

    def __init__(self, unet: torch.nn.Module, *, flags: dict[str, Any], build_new: bool = True,
                 folder: Path | None = None) -> None:
        self.unet = unet
        self.flags = flags
        self.build_new = build_new
        self.folder = folder
        #: Signature → bound package, or None for "run eager".
        self.packages: dict[Signature, Loaded | None] = {}
        self.flux = _is_flux(unet)
        self.what = _what(unet)

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        stats["eager_calls"] += 1
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        unet = self.unet
        if torch.is_grad_enabled() or unet._forward_hooks or unet._forward_pre_hooks:
            return self.eager(*args, **kwargs)
        tensors = flux_call_inputs(args, kwargs) if self.flux else call_inputs(args, kwargs)
        if tensors is None:
            return self.eager(*args, **kwargs)
        signature = signature_of(tensors)
        if signature not in self.packages:
            self.packages[signature] = self._prepare(signature, tensors)
        loaded = self.packages[signature]
        if loaded is None:
            return self.eager(*args, **kwargs)
        try:
            loaded.ensure_bound(unet)
        except PackageRejected as exc:
            log.warning("aot: the %s's weights no longer fit its compiled package (%s); running it eager", self.what, exc)
            self.packages[signature] = None
            return self.eager(*args, **kwargs)
        stats["compiled_calls"] += 1
        out = loaded.runner(*(t for _, t in tensors))
        if not kwargs.get("return_dict", True):
            return (out,)
        if self.flux:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def weights_changed(self) -> None:
        """After weights were merged or restored: bind every package to the module's tensors now
        (a parameter object may have been replaced, which the per-call address check cannot see)."""
        for signature, loaded in self.packages.items():
            if loaded is None:
                continue
            try:
                loaded.bind(self.unet)
            except PackageRejected as exc:
                log.warning("aot: %s; running the %s eager for %s", exc, self.what, signature.describe())
                self.packages[signature] = None

    def _prepare(self, signature: Signature, tensors: list[tuple[str, torch.Tensor]]) -> Loaded | None:
        folder = self.folder or cache_dir()
        device = tensors[0][1].device
        key = package_key(self.unet, signature, self.flags, device)
        try:
            loaded = load(folder, key)
        except PackageRejected as exc:
            stats["rejected"] += 1
            log.warning("aot: not using a compiled %s package: %s", self.what, exc)
            discard(folder, key)
            loaded = None
        if loaded is None and self.build_new:
            try:
                build(self.unet, tensors, key, folder)
                loaded = load(folder, key)
            except Exception as exc:  # noqa: BLE001 - any failure to compile leaves eager, which works
                log.warning("aot: could not compile the %s for inputs %s (%s: %s); running it eager",
                            self.what, signature.describe(), type(exc).__name__, exc)
                return None
        if loaded is None:
            return None
        try:
            loaded.bind(self.unet)
        except PackageRejected as exc:
            log.warning("aot: %s; running the %s eager", exc, self.what)
            return None
        return loaded


def install(unet: torch.nn.Module, *, flags: dict[str, Any], build_new: bool = True,
            folder: Path | None = None) -> AotForward:
    forward = AotForward(unet, flags=flags, build_new=build_new, folder=folder)
    unet.forward = forward
    return forward


def uninstall(unet: torch.nn.Module) -> None:
    if isinstance(unet.__dict__.get("forward"), AotForward):
        del unet.__dict__["forward"]
