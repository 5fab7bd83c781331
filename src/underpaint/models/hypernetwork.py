"""Hypernetworks: the small networks A1111 applies with ``<hypernet:name:strength>`` tags.

A hypernetwork file (``models/hypernetworks/*.pt``, read with ``torch.load(weights_only=True)``;
a file that needs code to load is refused) maps attention widths to a pair of residual MLPs. Where
an attention layer's key/value input has a width the file covers, that input goes through the
pair before the key and value projections::

    key   = to_k(h_k(context)),   h_k(c) = c + mlp_k(c) * strength
    value = to_v(h_v(context)),   h_v(c) = c + mlp_v(c) * strength

``context`` is the text embedding in cross-attention and the layer's own input in self-attention
(A1111 applies hypernetworks to both: the early NovelAI files cover the UNet's 320/640/1280 widths
as well as the 768 of SD 1.x's text embedding). Several hypernetworks run one after the other, in
prompt order. The query and the rest of the model are untouched.

The file layout (A1111's, and NovelAI's before it):

- integer keys: a width → ``[state_dict_k, state_dict_v]``, each the MLP's ``linear.N.weight`` /
  ``linear.N.bias`` tensors (the oldest files: ``linear1.*`` and ``linear2.*``, two Linear layers
  with nothing between them);
- ``activation_func``: ``linear`` (none) or an activation, put after every Linear layer but the
  last (after the last too with ``activate_output``); A1111 reads ``swish`` as hard swish;
- ``is_layer_norm``: a LayerNorm after each Linear layer (after its activation);
- ``layer_structure`` (widths relative to the input, e.g. ``[1, 2, 1]``), dropout settings and
  training records, which do not change what the network computes outside training.

The MLP is rebuilt from the tensors present (their shapes give the Linear and LayerNorm layers,
checked to chain from the width back to the width) and the activation the file names. It runs in
float32 on the device and dtype of the tensor it is given (the result cast back), so the same file
serves fp16 GPUs and CPUs.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidParameter, ModelError, UnknownName
from .registry import NamedFile, find_named_file, list_named_files

#: A1111 lists ``.pt`` files in ``models/hypernetworks``.
HYPERNETWORK_EXTENSIONS = (".pt",)

#: Activations by the name a file stores (A1111's names, including its reading of "swish").
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
    "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "mish": torch.nn.Mish, "hardswish": torch.nn.Hardswish,
    "hardsigmoid": torch.nn.Hardsigmoid, "hardtanh": torch.nn.Hardtanh, "relu6": torch.nn.ReLU6,
    "selu": torch.nn.SELU, "celu": torch.nn.CELU, "softplus": torch.nn.Softplus, "softsign": torch.nn.Softsign,
    "tanhshrink": torch.nn.Tanhshrink, "logsigmoid": torch.nn.LogSigmoid, "rrelu": torch.nn.RReLU,
    "hardshrink": torch.nn.Hardshrink, "softshrink": torch.nn.Softshrink,
}

_OLD_NAMES = re.compile(r"^linear([12])\.(weight|bias)$")
_NAME = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


# --------------------------------------------------------------------------- files on disk


def list_hypernetworks(folders: Iterable[Path]) -> list[NamedFile]:
    """Every hypernetwork file under ``folders`` (recursively, as A1111 does), sorted by relative name."""
    return list_named_files(folders, HYPERNETWORK_EXTENSIONS)


def resolve_hypernetwork(name: str, folders: Iterable[Path]) -> Path:
    """The file a tag names, by relative path or file name; an unknown name lists those there are."""
    entries = list_hypernetworks(folders)
    found = find_named_file(entries, name)
    if found is None:
        raise UnknownName("hypernet", name, [e.name for e in entries])
    return found


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class HypernetworkRequest:
    """One ``<hypernet:name:strength>`` tag (strength 1 when left out, as in A1111)."""

    name: str
    strength: float = 1.0

    @classmethod
    def from_args(cls, name: str, positional: Sequence[str] = ()) -> HypernetworkRequest:
        """
        >>> HypernetworkRequest.from_args("anime", ("0.6",))
        HypernetworkRequest(name='anime', strength=0.6)
        """
        text = positional[0] if positional else "1"
        try:
            strength = float(text)
        except ValueError:
            strength = math.nan
        if not math.isfinite(strength):
            raise InvalidParameter("prompt", f"<hypernet:{name}:{text}>", "a number as the hypernetwork's strength, "
                                                                         "e.g. <hypernet:name:0.8>")
        return cls(name.strip(), strength)

    @classmethod
    def parse(cls, text: str) -> HypernetworkRequest:
        """``name`` or ``name:strength`` (the ``--hypernet`` flag)."""
        name, *args = str(text).split(":")
        if not name.strip():
            raise InvalidParameter("hypernet", text, "NAME or NAME:STRENGTH, e.g. anime:0.8")
        return cls.from_args(name, tuple(args))

    def tag(self) -> str:
        return f"<hypernet:{self.name}:{self.strength:g}>"


def with_hypernetwork_tag(prompt: str, name: str, strength: float) -> str:
    """A1111's "Add hypernetwork to prompt" setting: ``prompt`` with ``<hypernet:name:strength>`` at its
    end (no space, as A1111 appends it), unless one of its tags names that network already.

    >>> with_hypernetwork_tag("a barn", "anime", 1.0)
    'a barn<hypernet:anime:1.0>'
    >>> with_hypernetwork_tag("a barn <hypernet:anime:0.4>", "anime", 1.0)
    'a barn <hypernet:anime:0.4>'
    """
    from ..prompts.parser import extract_extra_networks

    if any(tag.kind == "hypernet" and tag.name == name for tag in extract_extra_networks(prompt)[1]):
        return prompt
    return f"{prompt}<hypernet:{name}:{float(strength)}>"


# --------------------------------------------------------------------------- the networks


@dataclass(eq=False)
class Hypernetwork:
    """A loaded hypernetwork: width → (key MLP, value MLP), float32 on the CPU."""

    name: str
    path: Path
    layers: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]]
    activation: str = "linear"
    #: Copies on other devices, made on first use there.
    _placed: dict[str, dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]]] = field(default_factory=dict)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self.layers))

    def pair(self, width: int, device: torch.device) -> tuple[torch.nn.Sequential, torch.nn.Sequential] | None:
        """The (key, value) MLPs for inputs ``width`` wide, on ``device``; None where the file has none."""
        if width not in self.layers:
            return None
        if device.type == "cpu":
            return self.layers[width]
        placed = self._placed.get(str(device))
        if placed is None:
            placed = {w: tuple(copy.deepcopy(mlp).to(device) for mlp in pair) for w, pair in self.layers.items()}
            self._placed[str(device)] = placed
        return placed[width]


def load_hypernetwork(path: str | os.PathLike, *, name: str | None = None) -> Hypernetwork:
    """Read a hypernetwork file (see the module docstring), checking every tensor it holds."""
    from .header import load_torch_object

    path = Path(path)
    obj = load_torch_object(path)
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, expected a hypernetwork (a dict with width keys)")
    activation = obj.get("activation_func") or "linear"
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ModelError(f"{path}: activation_func {activation!r} is not one underpaint knows "
                         f"(known: {', '.join(sorted(ACTIVATIONS))})")
    activation = activation.lower()
    activate_output = bool(obj.get("activate_output", False))
    layers: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]] = {}
    for key, value in obj.items():
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if not isinstance(key, int) or isinstance(key, bool):
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, dict) for v in value)):
            raise ModelError(f"{path}: width {key} holds {type(value).__name__}, expected [key weights, value weights]")
        layers[key] = tuple(_mlp(path, f"{key}/{part}", key, sd, activation, activate_output)
                            for part, sd in zip(("k", "v"), value))
    if not layers:
        raise ModelError(f"{path}: no hypernetwork layers (integer width keys) in this file")
    return Hypernetwork(name or path.stem, path, layers, activation)


def _mlp(path: Path, label: str, width: int, state: dict, activation: str, activate_output: bool) -> torch.nn.Sequential:
    """One residual branch's MLP, rebuilt from its tensors (see the module docstring)."""
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = str(key)
        if (old := _OLD_NAMES.match(key)) is not None:
            key = f"linear.{int(old.group(1)) - 1}.{old.group(2)}"
        match = _NAME.match(key)
        if match is None or not isinstance(tensor, torch.Tensor):
            raise ModelError(f"{path}: {label}: unexpected entry {key!r} (expected linear.N.weight / linear.N.bias)")
        entries.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    linears = [i for i, e in sorted(entries.items()) if "weight" in e and e["weight"].ndim == 2]
    if not linears:
        raise ModelError(f"{path}: {label}: no Linear layers")
    layers: list[torch.nn.Module] = []
    features = width
    for index, entry in sorted(entries.items()):
        weight, bias = entry.get("weight"), entry.get("bias")
        if weight is None or bias is None or bias.ndim != 1:
            raise ModelError(f"{path}: {label}: layer {index} needs a weight and a 1-d bias")
        if weight.ndim == 2:
            out_features, in_features = weight.shape
            if in_features != features or bias.shape[0] != out_features:
                raise ModelError(f"{path}: {label}: Linear layer {index} is {in_features}→{out_features} wide "
                                 f"(bias {bias.shape[0]}) after {features} features")
            module = torch.nn.Linear(in_features, out_features)
            layers.append(module)
            if activation != "linear" and (index != linears[-1] or activate_output):
                layers.append(ACTIVATIONS[activation]())
            features = out_features
        elif weight.ndim == 1:
            if weight.shape != (features,) or bias.shape != (features,):
                raise ModelError(f"{path}: {label}: LayerNorm {index} is {weight.shape[0]} wide after {features} features")
            module = torch.nn.LayerNorm(features)
            layers.append(module)
        else:
            raise ModelError(f"{path}: {label}: layer {index} has a {weight.ndim}-d weight")
        with torch.no_grad():
            module.weight.copy_(weight.float())
            module.bias.copy_(bias.float())
    if features != width:
        raise ModelError(f"{path}: {label}: the last layer gives {features} features, expected {width}")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


# --------------------------------------------------------------------------- applying them


def attention_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's attention layers (diffusers ``Attention``), self- and cross-attention alike."""
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def input_width(projection: torch.nn.Module) -> int | None:
    """The width of a projection's input (a Linear layer's, or a compressed one's weight's last dimension)."""
    width = getattr(projection, "in_features", None)
    if width is None and isinstance(getattr(projection, "weight", None), torch.Tensor):
        width = projection.weight.shape[-1]
    return width


class _Branch:
    """A forward pre-hook giving a projection its input through each hypernetwork's MLP in turn."""

    def __init__(self, networks: Sequence[tuple[Hypernetwork, float]], width: int, part: int):
        self.networks, self.width, self.part = networks, width, part

    def __call__(self, module, args):
        x, *rest = args
        y = x.float()
        with torch.no_grad():
            for network, strength in self.networks:
                mlp = network.pair(self.width, x.device)[self.part]
                y = y + mlp(y) * strength
        return (y.to(x.dtype), *rest)


@contextmanager
def hypernetworks_applied(unet: torch.nn.Module, networks: Sequence[tuple[Hypernetwork, float]]) -> Iterator[int]:
    """Inside the block, ``unet``'s attention layers run their key/value inputs through ``networks``
    (hypernetwork, strength) where the widths match; yields how many layers that is.

    Hooks on the projections do it, removed on exit; fused projections (``--optimize fused_qkv``)
    run unfused meanwhile, and a compiled UNet runs its own ``forward`` (compiled code ignores hooks).
    """
    from .optimize import eager

    handles, unfused = [], []
    try:
        for layer in attention_layers(unet) if networks else ():
            width = input_width(layer.to_k)
            chosen = [(n, s) for n, s in networks if width in n.layers]
            if not chosen:
                continue
            handles.append(layer.to_k.register_forward_pre_hook(_Branch(chosen, width, 0)))
            handles.append(layer.to_v.register_forward_pre_hook(_Branch(chosen, width, 1)))
            if getattr(layer, "fused_projections", False) and getattr(layer, "original_processor", None) is not None:
                unfused.append((layer, layer.processor))
                layer.processor = layer.original_processor
        with eager(unet) if handles else nullcontext():
            yield len(handles) // 2
    finally:
        for handle in handles:
            handle.remove()
        for layer, processor in unfused:
            layer.processor = processor
