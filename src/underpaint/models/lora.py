"""LoRA and LyCORIS networks merged into a loaded model's weights for the length of one request.

Files read (safetensors, or torch files opened with ``weights_only``):

- kohya / A1111: ``lora_unet_<module>``, ``lora_te_<module>`` (SD1/SD2), ``lora_te1_``/``lora_te2_``
  (SDXL's two encoders), each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
  LoCon convolutions (a k×k down and a 1×1 up), LyCORIS ``lora_mid`` (CP decomposition),
  LoHa (``hada_w1_a`` …, ``hada_t1``), LoKr (``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` …),
  full differences (``diff``, ``diff_b``), DoRA magnitudes (``dora_scale``), OFT rotations (kohya's and
  LyCORIS' ``oft_blocks`` with an ``alpha`` constraint and ``rescale``, LyCORIS' butterfly BOFT, the older
  ``oft_diag``), IA³ scalings (``weight``, ``on_input``) and norm-layer differences (``w_norm``, ``b_norm``);
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (also ``text_encoder.``,
  ``text_encoder_2.``, the older ``lora.down``/``lora.up`` and attention-processor names);
- FLUX.1: diffusers' ``transformer.<module>`` names, and the original (BFL) module names as kohya
  (``lora_unet_double_blocks_0_img_attn_qkv``), ComfyUI (``diffusion_model.double_blocks.0...``)
  and other trainers write them. The original fused projections (double blocks' ``qkv``, single
  blocks' ``linear1`` = q, k, v and the MLP input) are split over the separate diffusers modules
  by rows, with exactly the row map the checkpoint loader uses (``final_layer.adaLN_modulation``'s
  halves swapped), so a fused LoRA update lands where its full-weight counterpart would.

A kohya name is a module path with its dots turned into underscores, in either of two
spellings: diffusers' (``lora_unet_down_blocks_1_attentions_0_proj_in``) or the original LDM
one (``lora_unet_input_blocks_4_1_proj_in``, which SDXL trainers write). :class:`ModuleIndex`
lists both spellings for every Linear and Conv2d the loader built, deriving the LDM names
from :func:`underpaint.models.convert.unet_module_map`, so any UNet depth is covered.

The arithmetic is A1111 1.10's (its built-in Lora extension): ΔW = up·down (or the LoHa/LoKr
product) reshaped to the weight, times alpha/rank (or a stored ``scale``), re-normalised by
DoRA when present, times the multiplier: the text-encoder one for text-encoder modules, the
UNet one otherwise. Several networks add up in prompt order. A1111 adds each ΔW in the
model's dtype; here the sum is formed in float32 and cast once (identical for fp32 models).

Reversibility: before a weight is changed its original values are copied to the CPU, and
:meth:`LoraPatcher.restore` copies them back, so the base weights are bit-identical afterwards.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidParameter, ModelError, UnknownName
from .registry import NamedFile, find_named_file, list_named_files

#: File suffixes A1111 lists in its Lora folder.
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
#: The model parts a network can patch: the UNet and up to two text encoders.
UNET = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Tensor names after the module part, normalised to kohya's spelling.
_PART_ALIASES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
}
_PARTS = frozenset({
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale", "dora_scale", "diff", "diff_b",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "oft_diag", "rescale", "w_norm", "b_norm", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
})
# Other LyCORIS kinds A1111 knows but underpaint does not merge (reported, not guessed at), and IA³'s
# parts (``weight``, ``on_input``: read from kohya-style names only, where they cannot be a model's own).
_OTHER_PARTS = ("oft_", "weight", "bias", "w_norm", "b_norm", "on_input", "oft_blocks", "oft_diag")
# kohya prefix → index of the text encoder (None: the UNet), by how many encoders the model has.
_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
# The attention-processor LoRA of older diffusers files: ``attn1.processor.to_q_lora.down.weight``
# in the UNet, ``self_attn.to_q_lora.down.weight`` in a text encoder.
_PROCESSOR_LORA = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TEXT_PROCESSOR_LORA = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_")


class LoraWarning(UserWarning):
    """Part of a LoRA file could not be used (unknown modules, shapes, kinds); the rest is applied."""


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA asked for by ``<lora:name:te:unet>`` or ``--lora name:weight``, with A1111's multipliers.

    The first number multiplies the text-encoder patches, the second the UNet's (default: the
    first); ``te=``, ``unet=`` and ``dyn=`` (keep only the first ``dyn`` ranks) override them.
    """

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None

    @classmethod
    def from_args(cls, name: str, positional: Sequence[str] = (), named: Mapping[str, str] | None = None) -> LoraRequest:
        """From a tag's fields after the name, as A1111's ``ExtraNetworkLora`` reads them.

        >>> LoraRequest.from_args("film", ("0.8",))
        LoraRequest(name='film', te=0.8, unet=0.8, dyn=None)
        >>> LoraRequest.from_args("film", ("0.8", "0.5"))
        LoraRequest(name='film', te=0.8, unet=0.5, dyn=None)
        >>> LoraRequest.from_args("film", (), {"unet": "0.3"})
        LoraRequest(name='film', te=1.0, unet=0.3, dyn=None)
        """
        named = dict(named or {})
        te = _number(name, named.get("te", positional[0] if positional else 1.0))
        unet = _number(name, named.get("unet", positional[1] if len(positional) > 1 else te))
        dyn_text = named.get("dyn", positional[2] if len(positional) > 2 else None)
        dyn = None if dyn_text is None else int(_number(name, dyn_text, whole=True))
        return cls(name.strip(), te, unet, dyn)

    @classmethod
    def parse(cls, text: str) -> LoraRequest:
        """``name``, ``name:weight``, ``name:te:unet`` or ``name:unet=0.5`` (the ``--lora`` flag).

        >>> LoraRequest.parse("detail tweaker:0.6")
        LoraRequest(name='detail tweaker', te=0.6, unet=0.6, dyn=None)
        """
        name, *args = str(text).split(":")
        if not name.strip():
            raise InvalidParameter("lora", text, "NAME or NAME:WEIGHT, e.g. film-grain:0.8")
        positional = tuple(a for a in args if len(a.split("=", 2)) != 2)
        named = dict(p for p in (a.split("=", 2) for a in args) if len(p) == 2)
        return cls.from_args(name, positional, named)

    def tag(self) -> str:
        """The prompt tag that asks for the same thing (``<lora:name:0.8>``)."""
        fields = [self.name, _short(self.te)]
        if self.unet != self.te or self.dyn is not None:
            fields.append(_short(self.unet))
        if self.dyn is not None:
            fields.append(str(self.dyn))
        return "<lora:" + ":".join(fields) + ">"


def _number(name: str, value: object, *, whole: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (whole and (number != int(number) or number < 1)) or \
            (not whole and abs(number) > MAX_MULTIPLIER):
        kind = "a whole number of ranks (dyn)" if whole else \
            f"a number from -{MAX_MULTIPLIER} to {MAX_MULTIPLIER} (the multiplier)"
        raise InvalidParameter("lora", f"{name}:{value}", kind) from None
    return number


#: The largest LoRA multiplier taken (far past what changes a picture usefully; 1e30 overflowed every
#: weight it touched).
MAX_MULTIPLIER = 100


def _short(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --------------------------------------------------------------------------- files on disk


def list_loras(folders: Iterable[Path]) -> list[NamedFile]:
    """Every LoRA file under ``folders`` (recursively, as A1111 does), sorted by relative name."""
    return list_named_files(folders, LORA_EXTENSIONS)


def resolve_lora(name: str, folders: Iterable[Path]) -> Path:
    """The file a tag names: by relative path, file name (A1111), or the ``ss_output_name`` alias.

    An unknown name is an :class:`UnknownName` error that lists the LoRAs there are.
    """
    entries = list_loras(folders)
    found = find_named_file(entries, name)
    if found is None:
        found = next((e.path for e in entries if _alias(e.path) == name.strip()), None)
    if found is None:
        raise UnknownName("lora", name, [e.name for e in entries])
    return found


def _alias(path: Path) -> str | None:
    """The name the trainer stored (kohya's ``ss_output_name``), which A1111 also accepts."""
    if path.suffix.lower() != ".safetensors":
        return None
    from .header import read_header

    try:
        return read_header(path).metadata.get("ss_output_name")
    except ModelError:
        return None


def lora_short_hash(path: str | os.PathLike) -> str:
    """A1111's hash for ``Lora hashes``: the trainer's ``sshs_model_hash`` if stored, else the
    addnet hash (sha256 of the tensor bytes) of a safetensors file, else the file's sha256; 12 hex."""
    from .hashes import addnet_hash, file_sha256
    from .header import read_header, sniff_format

    path = Path(path)
    if sniff_format(path) == "safetensors":
        stored = read_header(path).metadata.get("sshs_model_hash")
        return (stored or addnet_hash(path))[:12]
    return file_sha256(path)[:12]


# --------------------------------------------------------------------------- module index


@dataclass(frozen=True, eq=False)
class Target:
    """A module a network patches: which part of the model, its dotted path there (text-encoder
    paths always start with ``text_model.``, as in transformers 4 and the LoRA files), the module."""

    component: str
    path: str
    module: torch.nn.Module


class ModuleIndex:
    """Network names (underscored module paths, per model part) → the loaded Linear/Conv2d modules."""

    def __init__(self, model) -> None:
        self.encoders = len(model.text_encoders)
        self._targets: dict[tuple[str, str], Target] = {}
        self._layers = {c: int(e.config.num_hidden_layers) for c, e in zip(TEXT_ENCODERS, model.text_encoders)}
        #: FLUX: the transformer width and the original (BFL) module names, underscored → dotted.
        self._flux_hidden: int | None = None
        self._flux_names: dict[str, str] = {}
        if _is_flux(model.unet):
            self._add_flux(model.unet)
        else:
            self._add_unet(model.unet)
        for component, encoder in zip(TEXT_ENCODERS, model.text_encoders):
            for path, module in _patchable(encoder):
                raw = path
                if not path.startswith(("text_model.", "text_projection")):
                    path = "text_model." + path  # transformers 5 flattened CLIPTextModel
                target = Target(component, path, module)
                self._add(target, path)
                self._add(target, raw)  # T5 (FLUX's second encoder) keys use its own module paths

    def _add_unet(self, unet: torch.nn.Module) -> None:
        original = _original_unet_names(unet.config)
        for path, module in _patchable(unet):
            target = Target(UNET, path, module)
            self._add(target, path)
            ldm = original(path)
            if ldm is not None:
                self._add(target, ldm)

    def _add_flux(self, transformer: torch.nn.Module) -> None:
        from .flux import original_module_names

        for path, module in _patchable(transformer):
            self._add(Target(UNET, path, module), path)
        config = transformer.config
        self._flux_hidden = int(config.num_attention_heads * config.attention_head_dim)
        self._flux_names = {n.replace(".", "_"): n for n in original_module_names(config)}

    def fused(self, component: str, name: str, rows: int) -> list[tuple[Target, torch.Tensor]] | None:
        """For an original FLUX module name: the diffusers modules its ``rows`` output rows go to,
        each with the row indices it takes (None for any other name)."""
        dotted = self._flux_names.get(name) if component == UNET else None
        if dotted is None:
            return None
        from .flux import row_map

        try:
            mapping = row_map(dotted, rows, self._flux_hidden)
        except ModelError:
            return None
        found = []
        for path, index in mapping.items():
            target = self.find(UNET, path.replace(".", "_"))
            if target is None:
                return None
            found.append((target, index))
        return found

    def _add(self, target: Target, dotted: str) -> None:
        self._targets.setdefault((target.component, dotted.replace(".", "_")), target)

    def find(self, component: str, name: str) -> Target | None:
        """The module for an underscored name (``down_blocks_0_attentions_0_proj_in``) in ``component``."""
        return self._targets.get((component, name))

    def targets(self, component: str | None = None) -> list[Target]:
        """Every patchable module once (of ``component`` only, when given)."""
        unique = {id(t.module): t for t in self._targets.values() if component in (None, t.component)}
        return list(unique.values())

    def left_out(self, component: str, name: str) -> bool:
        """A text-encoder layer the model does not build because its output is never used (SD2 stops
        at OpenCLIP's penultimate layer): LoRA tensors for it change nothing and are skipped quietly."""
        match = _LAYER.match(name)
        return component in self._layers and match is not None and int(match.group(1)) >= self._layers[component]

    def __len__(self) -> int:
        return len(self.targets())


def _is_flux(unet: torch.nn.Module) -> bool:
    return hasattr(getattr(unet, "config", None), "num_single_layers")


#: The layers a network may change: projections and convolutions, and the norms (a norm network's).
_PATCHABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _patchable(module: torch.nn.Module):
    for path, child in module.named_modules():
        if (isinstance(child, _PATCHABLE) and getattr(child, "weight", None) is not None) or _is_stored(child):
            yield path, child


def _is_stored(module: torch.nn.Module) -> bool:
    """A layer whose weight stays compressed (fp8, GGUF): LoRA updates are added at run time instead."""
    return hasattr(module, "dequantized_weight") and hasattr(module, "low_rank")


def _original_unet_names(config) -> Callable[[str], str | None]:
    """A function from a diffusers UNet module path to its original LDM path (None if it has none)."""
    from .configs import UNetLayout
    from .convert import unet_module_map

    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        if len(set(per_block)) != 1:
            return lambda path: None
        per_block = per_block[0]
    levels = len(config.block_out_channels)
    up_depth = tuple(1 if "CrossAttn" in t else 0 for t in config.up_block_types)
    down_depth = tuple(1 if "CrossAttn" in t else 0 for t in config.down_block_types)
    layout = UNetLayout(levels, per_block, tuple(config.block_out_channels), down_depth, up_depth, 1)
    inverse = {new: (old, {v: k for k, v in inner.items()}) for old, (new, inner) in unet_module_map(layout).items()}

    def original(path: str) -> str | None:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in inverse:
                old, inner = inverse[prefix]
                rest = ".".join(parts[i:])
                for new_name, old_name in inner.items():
                    if rest == new_name or rest.startswith(new_name + "."):
                        rest = old_name + rest[len(new_name):]
                        break
                return f"{old}.{rest}" if rest else old
        return None

    return original


# --------------------------------------------------------------------------- key names


@dataclass(frozen=True)
class NetworkKey:
    """A network tensor name split into the model part, the module (underscored) and the tensor part."""

    component: str
    module: str  # underscored
    part: str


def split_key(key: str, encoders: int) -> NetworkKey | None:
    """(model part, underscored module name, tensor part) of a network tensor name, or None.

    >>> split_key("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", 1)
    NetworkKey(component='unet', module='input_blocks_4_1_proj_in', part='lora_down.weight')
    >>> split_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha", 2)
    NetworkKey(component='text_encoder_2', module='text_model_encoder_layers_0_mlp_fc1', part='alpha')
    >>> split_key("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", 1)
    NetworkKey(component='unet', module='down_blocks_0_attentions_0_proj_in', part='lora_down.weight')
    """
    for prefix in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            module, _, part = key[len(prefix):].partition(".")
            component = _kohya_component(prefix, encoders)
            part = _PART_ALIASES.get(part, part)
            return NetworkKey(component, module, part) if component and module and part else None
    return _split_dotted(key)


def _kohya_component(prefix: str, encoders: int) -> str | None:
    """``lora_te_`` is the single encoder of SD1/SD2 (A1111 does not match it on SDXL)."""
    if prefix == "lora_unet_":
        return UNET
    if prefix == "lora_te1_":
        return TEXT_ENCODERS[0]
    if prefix == "lora_te2_":
        return TEXT_ENCODERS[1] if encoders > 1 else None
    return TEXT_ENCODERS[0] if encoders == 1 else None


#: Where the model's denoiser is named in dotted LoRA keys: diffusers' UNet and FLUX transformer, and
#: ComfyUI's ``diffusion_model``; original FLUX names may also come with no head at all.
_DENOISER_HEADS = (UNET, "transformer", "diffusion_model")
_FLUX_TOP = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.")


def _split_dotted(key: str) -> NetworkKey | None:
    """diffusers/PEFT names: ``<part of the model>.<module path>.<tensor part>``."""
    key = key.removeprefix("base_model.model.")
    if key.startswith(_FLUX_TOP):
        key = "diffusion_model." + key
    head, _, rest = key.partition(".")
    if head not in (*_DENOISER_HEADS, *TEXT_ENCODERS) or not rest:
        return None
    if head in _DENOISER_HEADS:
        head = UNET
    for part in sorted((*_PART_ALIASES, *_PARTS), key=len, reverse=True):
        if rest.endswith("." + part):
            module = rest[: -len(part) - 1]
            break
    else:
        return None
    module = module.replace(".processor.", ".")
    parent, _, last = module.rpartition(".")
    renames = _PROCESSOR_LORA if head == UNET else _TEXT_PROCESSOR_LORA
    if last in renames:
        module = f"{parent}.{renames[last]}" if parent else renames[last]
    return NetworkKey(head, module.replace(".", "_"), _PART_ALIASES.get(part, part))


# --------------------------------------------------------------------------- weight updates


@dataclass(frozen=True, eq=False)
class ModulePatch:
    """One module's stored update: its kind (lora, loha, lokr, full, oft, ia3, glora, norm) and tensors by part
    name."""

    target: Target
    kind: str
    tensors: Mapping[str, torch.Tensor]

    @property
    def rank(self) -> int | None:
        """A1111's ``dim``: the rank that alpha is divided by."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            for name in ("lokr_w2_b", "lokr_w1_b"):
                if name in t:
                    return int(t[name].shape[0])
        if self.kind == "glora":
            return int(t["a1.weight"].shape[0] if _glora_is_old(t) else t["a2.weight"].shape[0])
        return None

    @property
    def scale(self) -> float:
        """A stored ``scale``, else alpha / rank, else 1 (A1111's ``calc_scale``; an OFT's alpha is its
        constraint, its scale always 1)."""
        if self.kind == "oft":
            return 1.0
        if "scale" in self.tensors:
            return float(self.tensors["scale"])
        alpha, rank = self.tensors.get("alpha"), self.rank
        if alpha is not None and rank:
            return float(alpha) / rank
        return 1.0

    def delta(self, weight: torch.Tensor, *, dyn: int | None = None) -> torch.Tensor:
        """ΔW for ``weight`` (the current values, float32), before the multiplier.

        Raises ValueError when the update does not fit the weight's shape.
        """
        t = {k: v.to(weight.device, torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            updown, shape = _lora_updown(t, dyn)
        elif self.kind == "loha":
            updown, shape = _loha_updown(t)
        elif self.kind == "lokr":
            updown, shape = _lokr_updown(t, weight.shape)
        elif self.kind == "oft":
            updown, shape = _oft_updown(t, weight), list(weight.shape)
        elif self.kind == "ia3":
            updown, shape = _ia3_updown(t, weight), list(weight.shape)
        elif self.kind == "glora":
            updown, shape = _glora_updown(t, weight), list(weight.shape)
        elif self.kind == "norm":
            updown, shape = t["w_norm"], list(t["w_norm"].shape)
        else:
            updown, shape = t["diff"], list(t["diff"].shape)
        updown = _fit(updown.reshape(shape) if len(shape) == 4 else updown, weight.shape)
        updown = updown * self.scale
        if "dora_scale" in t:
            updown = _weight_decompose(updown, weight, t["dora_scale"])
        return updown

    def bias_delta(self) -> torch.Tensor | None:
        """A full-difference (``diff_b``) or norm network's (``b_norm``) bias change, before the multiplier."""
        return self.tensors.get("diff_b", self.tensors.get("b_norm"))


def _kind(parts: Mapping[str, torch.Tensor]) -> str | None:
    """Which update the tensors make, tried in A1111's order."""
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "lora"
    if all(f"hada_w{i}_{ab}" in parts for i in (1, 2) for ab in "ab"):
        return "loha"
    has = lambda i: f"lokr_w{i}" in parts or (f"lokr_w{i}_a" in parts and f"lokr_w{i}_b" in parts)  # noqa: E731
    if has(1) and has(2):
        return "lokr"
    if "diff" in parts:
        return "full"
    if "w_norm" in parts and "b_norm" in parts:
        return "norm"
    if "oft_blocks" in parts or "oft_diag" in parts:
        return "oft"
    if all(f"{p}.weight" in parts for p in ("a1", "a2", "b1", "b2")):
        return "glora"
    if "weight" in parts:
        return "ia3"
    return None


def _lora_updown(t: dict[str, torch.Tensor], dyn: int | None) -> tuple[torch.Tensor, list[int]]:
    """up·down, through the kernel for LoCon convolutions and the CP core when ``lora_mid`` is present."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    shape = [up.shape[0], down.shape[1]]
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"]
        return torch.einsum("nmkl,in,mj->ijkl", mid, up2, down2), shape + list(mid.shape[2:])
    if down.ndim == 4:
        shape += list(down.shape[2:])
    if dyn is not None:
        up2, down2 = up2[:, :dyn], down2[:dyn]
    return (up2 @ down2).reshape(shape), shape


def _cp(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker/CP core expanded with its two factor matrices (LyCORIS ``make_weight_cp``)."""
    return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)


def _loha_updown(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """LoHa (Hyeon-Woo et al. 2022, FedPara): the Hadamard product of two low-rank products."""
    w1a, w1b, w2a, w2b = (t[f"hada_w{n}"] for n in ("1_a", "1_b", "2_a", "2_b"))
    if "hada_t1" in t:
        shape = [w1a.shape[1], w1b.shape[1], *t["hada_t1"].shape[2:]]
        first = _cp(t["hada_t1"], w1a, w1b)
    else:
        shape = [w1a.shape[0], w1b.shape[1], *w1b.shape[2:]]
        first = (w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)).reshape(shape)
    if "hada_t2" in t:
        second = _cp(t["hada_t2"], w2a, w2b)
    else:
        second = (w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)).reshape(shape)
    return first * second, shape


def _lokr_updown(t: dict[str, torch.Tensor], weight_shape: torch.Size) -> tuple[torch.Tensor, list[int]]:
    """LoKr (LyCORIS): the Kronecker product of two factors, each stored whole or as a low-rank pair."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    shape = list(weight_shape) if len(weight_shape) == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape), shape


def _cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Orthogonal blocks from free ones: Q = B − Bᵀ (skew-symmetric), its norm clamped to ``constraint``
    (0: not clamped), R = (I + Q)(I − Q)⁻¹."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint:
        norm = torch.linalg.vector_norm(q)
        q = q * ((norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft_updown(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """OFT (Qiu et al. 2023): the weight's output rows turned by a block-diagonal orthogonal matrix, as
    A1111 1.10 merges it: R·W − W. ``oft_blocks`` (kohya, LyCORIS) are made orthogonal by the Cayley
    transform with the constraint ``alpha`` × outputs; the older LyCORIS ``oft_diag`` are the rotations
    themselves; four-dimensional blocks are LyCORIS' BOFT, a butterfly of such rotations (stage i mixing
    rows 2^i·b/2 apart). A ``rescale`` scales each output row after."""
    out, rest = weight.shape[0], weight.shape[1:]
    if "oft_diag" in t and "oft_blocks" not in t:
        rotations = t["oft_diag"]
    else:
        blocks = t["oft_blocks"]
        alpha = float(t["alpha"]) if "alpha" in t else 0.0
        rotations = _cayley(blocks, alpha * out)
    if rotations.ndim == 3:  # one stage: row block k becomes Σ_n R[k, n, m] · W[k, n]
        count, size = rotations.shape[0], rotations.shape[-1]
        if count * size != out or rotations.shape[1] != size:
            raise ValueError(f"rotation blocks {tuple(rotations.shape)} do not fit {out} outputs")
        merged = torch.einsum("knm,kn...->km...", rotations, weight.reshape(count, size, *rest)).reshape(weight.shape)
    elif rotations.ndim == 4:
        stages, count, size = rotations.shape[:3]
        half = size // 2
        if count * size != out or size % 2 or any(out % (2 ** (i + 1) * half) for i in range(stages)):
            raise ValueError(f"butterfly blocks {tuple(rotations.shape)} do not fit {out} outputs")
        merged = weight
        for i in range(stages):
            span = 2 ** i * half  # rows paired across 2 · span, then mixed in blocks of ``size``
            merged = merged.reshape(-1, 2, span, *rest).transpose(1, 2).reshape(count, size, *rest)
            merged = torch.einsum("bij,bj...->bi...", rotations[i], merged)
            merged = merged.reshape(-1, span, 2, *rest).transpose(1, 2).reshape(weight.shape)
    else:
        raise ValueError(f"rotation blocks of shape {tuple(rotations.shape)}")
    if "rescale" in t:
        rescale = t["rescale"].reshape(-1)
        if rescale.numel() != out:
            raise ValueError(f"a rescale of {rescale.numel()} for {out} outputs")
        merged = merged * rescale.reshape(-1, *[1] * len(rest))
    return merged - weight


def _ia3_updown(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """IA³ (Liu et al. 2022): each output (or, ``on_input``, each input) channel of the weight scaled by
    1 + w; the update is W·w along that axis."""
    on_input = bool(float(t["on_input"])) if "on_input" in t else False
    axis = 1 if on_input else 0
    scales = t["weight"].reshape(-1)
    if weight.ndim < 2 or scales.numel() != weight.shape[axis]:
        raise ValueError(f"{scales.numel()} scales for {'inputs' if on_input else 'outputs'} of a "
                         f"{tuple(weight.shape)} weight")
    shape = [1] * weight.ndim
    shape[axis] = -1
    return weight * scales.reshape(shape)


def _glora_is_old(t: Mapping[str, torch.Tensor]) -> bool:
    """Whether a GLoRA module is in LyCORIS's first layout (``a1`` r x in, ``a2`` in x r, ``b1`` r x in, ``b2``
    out x r) rather than its current one (``a1`` in x r, ``a2`` r x in, ``b1`` out x r, ``b2`` r x in): the one
    whose rank dimensions agree; on a square layer both do, and the rank is the smaller side."""
    a1, a2, b1, b2 = (t[f"{p}.weight"].shape for p in ("a1", "a2", "b1", "b2"))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    current = b2[0] == b1[1] == a1[1] == a2[0]
    return a1[0] < a2[0] if old and current else old


def _glora_updown(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """GLoRA (Chavan et al. 2023, LyCORIS): W·A + B, A and B each a low-rank product. The current layout
    reads A = a1·a2 on the input side (a convolution's A mixes its input channels) and B = b1·b2; the first
    layout A = a2·a1 and B = b2·b1 on the flattened weight."""
    a1, a2, b1, b2 = (t[f"{p}.weight"].flatten(1) for p in ("a1", "a2", "b1", "b2"))
    if _glora_is_old(t):
        flat = weight.flatten(1)
        if a2.shape[0] != flat.shape[1] or b2.shape[0] != flat.shape[0] or b1.shape[1] != flat.shape[1]:
            raise ValueError(f"a GLoRA of {tuple(b2.shape[:1]) + tuple(b1.shape[1:])} for a {tuple(weight.shape)} weight")
        return (b2 @ b1 + flat @ a2 @ a1).reshape(weight.shape)
    if a1.shape[0] != weight.shape[1] or a2.shape[1] != weight.shape[1] or b1.shape[0] != weight.shape[0]:
        raise ValueError(f"a GLoRA of {b1.shape[0]} outputs and {a1.shape[0]} inputs for a {tuple(weight.shape)} weight")
    mixed = torch.einsum("oi...,ij->oj...", weight, a1 @ a2)
    return mixed + (b1 @ b2).reshape(weight.shape)


def _fit(updown: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Reshape to the weight (1×1 convs vs linear); a 4-channel update on a 9-channel inpainting
    input is zero-padded, as A1111 does."""
    if updown.shape == weight_shape:
        return updown
    if updown.numel() == math.prod(weight_shape):
        return updown.reshape(weight_shape)
    if len(weight_shape) == 4 and updown.ndim == 4 and weight_shape[1] == 9 and updown.shape[1] == 4 \
            and updown.shape[0] == weight_shape[0] and updown.shape[2:] == weight_shape[2:]:
        return torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))
    raise ValueError(f"update of shape {tuple(updown.shape)} does not fit weight {tuple(weight_shape)}")


def _weight_decompose(updown: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024): rescale W+ΔW so each input column has the stored magnitude."""
    merged = weight + updown
    columns = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = columns.reshape(merged.shape[1], *[1] * (merged.ndim - 1)).transpose(0, 1)
    return merged * (magnitude / norm) - weight


# --------------------------------------------------------------------------- networks


@dataclass(frozen=True, eq=False)
class LoraNetwork:
    """A LoRA file matched against one model: the patches it makes and what did not match."""

    name: str
    path: Path
    patches: tuple[ModulePatch, ...]
    #: Network tensor names that name no module of this model.
    unmatched: tuple[str, ...] = ()
    #: Modules whose tensors make no update kind underpaint merges.
    unsupported: tuple[str, ...] = ()


def load_lora(path: str | os.PathLike, index: ModuleIndex, *, name: str | None = None) -> LoraNetwork:
    """Read a LoRA file and match its tensors to ``index``'s modules.

    A file with no network tensors at all is a :class:`ModelError`; tensors that match no
    module, and modules with an update kind that is not supported, give a :class:`LoraWarning`
    (as A1111 logs them) and are left out.
    """
    from .header import load_state_dict

    path = Path(path)
    tensors = load_state_dict(path)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmatched, recognised = [], 0
    for key, value in tensors.items():
        parsed = split_key(key, index.encoders)
        if parsed is None or not _known_part(parsed.part):
            unmatched.append(key)
            continue
        recognised += 1
        groups.setdefault((parsed.component, parsed.module), {})[parsed.part] = value
    if not recognised:
        raise ModelError(f"{path}: not a LoRA file: none of its {len(tensors)} tensors is a network weight "
                         f"(e.g. {', '.join(sorted(tensors)[:3])}); expected lora_unet_*/lora_te_* "
                         "lora_down/lora_up tensors or diffusers lora_A/lora_B ones")
    patches, unsupported = [], []
    for (component, module), parts in groups.items():
        target = index.find(component, module)
        kind = _kind(parts)
        if target is None and kind is not None:
            split = _split_fused(index, component, module, kind, parts)
            if split is not None:
                patches.extend(split)
                continue
        if target is None:
            if not index.left_out(component, module):
                unmatched.extend(f"{component}:{module}.{p}" for p in parts)
        elif kind is None:
            unsupported.append(f"{component}:{module} ({', '.join(sorted(parts))})")
        else:
            patches.append(ModulePatch(target, kind, parts))
    network = LoraNetwork(name or path.stem, path, tuple(patches), tuple(unmatched), tuple(unsupported))
    _warn_leftovers(network)
    return network


# Tensors whose first dimension runs over the module's output rows (sliced when a fused module is split).
_ROW_PARTS = ("lora_up.weight", "diff", "diff_b", "hada_w1_a", "hada_w2_a")


def _split_fused(index: ModuleIndex, component: str, module: str, kind: str,
                 parts: Mapping[str, torch.Tensor]) -> list[ModulePatch] | None:
    """One update of an original fused FLUX module as updates of the diffusers modules it became."""
    if kind not in ("lora", "loha", "full") or "lora_mid.weight" in parts or "dora_scale" in parts:
        return None
    rows_of = next((parts[p].shape[0] for p in _ROW_PARTS if p in parts), None)
    mapping = index.fused(component, module, int(rows_of)) if rows_of is not None else None
    if mapping is None:
        return None
    return [ModulePatch(target, kind, {name: (value[rows] if name in _ROW_PARTS else value)
                                       for name, value in parts.items()})
            for target, rows in mapping]


def _known_part(part: str) -> bool:
    return part in _PARTS or part.startswith(_OTHER_PARTS)


def _warn_leftovers(network: LoraNetwork) -> None:
    if network.unmatched:
        warnings.warn(f"LoRA {network.name}: {len(network.unmatched)} tensors match no module of this model and "
                      f"are ignored (e.g. {', '.join(sorted(network.unmatched)[:4])}); "
                      f"{len(network.patches)} modules matched", LoraWarning, stacklevel=3)
    if network.unsupported:
        warnings.warn(f"LoRA {network.name}: {len(network.unsupported)} modules use an update kind underpaint "
                      f"does not merge and are ignored (e.g. {'; '.join(network.unsupported[:2])})",
                      LoraWarning, stacklevel=3)


# --------------------------------------------------------------------------- merging


@dataclass
class LoraPatcher:
    """Merges networks into a model's weights and restores the originals exactly.

    ``apply`` copies each weight it changes to the CPU first; ``restore`` copies them back.
    The backups are the only state, and ``restore`` is safe to call at any time.
    """

    _backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: Compressed-weight layers given run-time updates (cleared by ``restore``).
    _stored: dict[int, torch.nn.Module] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self._backups) or bool(self._stored)

    def apply(self, networks: Sequence[tuple[LoraNetwork, LoraRequest]]) -> int:
        """Restore, then merge ``networks`` (each with its request's multipliers); returns modules changed."""
        self.restore()
        per_module: dict[int, list[tuple[ModulePatch, float, int | None]]] = OrderedDict()
        modules: dict[int, torch.nn.Module] = {}
        for network, request in networks:
            for patch in network.patches:
                multiplier = request.unet if patch.target.component == UNET else request.te
                if multiplier == 0:
                    continue
                key = id(patch.target.module)
                modules[key] = patch.target.module
                per_module.setdefault(key, []).append((patch, multiplier, request.dyn))
        failed: list[str] = []
        try:
            with torch.no_grad():
                for key, items in per_module.items():
                    failed += self._merge(modules[key], items)
        except BaseException:
            self.restore()
            raise
        if failed:
            warnings.warn(f"LoRA: {len(failed)} updates do not fit this model's weights and are skipped "
                          f"(e.g. {'; '.join(failed[:2])})", LoraWarning, stacklevel=2)
        return len(self._backups) + len([m for m in self._stored.values() if id(m.bias) not in self._backups])

    def _merge(self, module: torch.nn.Module, items: list[tuple[ModulePatch, float, int | None]]) -> list[str]:
        if _is_stored(module):
            return self._add_runtime(module, items)
        weight, bias = module.weight, module.bias
        new_weight, new_bias = weight.detach().float(), None
        failed = []
        for patch, multiplier, dyn in items:
            try:
                delta = patch.delta(new_weight, dyn=dyn)
            except (ValueError, RuntimeError) as exc:
                failed.append(f"{patch.target.component}:{patch.target.path}: {exc}")
                continue
            new_weight = new_weight + delta * multiplier
            extra = patch.bias_delta()
            if extra is not None and bias is not None:
                base = bias.detach().float() if new_bias is None else new_bias
                new_bias = base + extra.to(base) * multiplier
        if len(failed) < len(items):
            self._write(weight, new_weight)
        if new_bias is not None:
            self._write(bias, new_bias)
        return failed

    def _add_runtime(self, module: torch.nn.Module, items: list[tuple[ModulePatch, float, int | None]]) -> list[str]:
        """Updates for a compressed-weight layer, added to its output at run time: plain LoRAs as
        low-rank pairs (no memory beyond the pair), other kinds as one dense difference."""
        failed: list[str] = []
        self._stored[id(module)] = module
        weight = None
        for patch, multiplier, dyn in items:
            t = patch.tensors
            try:
                if patch.kind == "lora" and "lora_mid.weight" not in t and "dora_scale" not in t \
                        and t["lora_down.weight"].ndim == 2:
                    up, down = t["lora_up.weight"], t["lora_down.weight"]
                    if dyn is not None:
                        up, down = up[:, :dyn], down[:dyn]
                    if tuple(up.shape[:1]) + tuple(down.shape[1:]) != (module.out_features, module.in_features):
                        raise ValueError(f"update {tuple(up.shape[:1]) + tuple(down.shape[1:])} does not fit "
                                         f"({module.out_features}, {module.in_features})")
                    device = module.packed.device
                    module.low_rank.append((up.to(device, torch.float32), down.to(device, torch.float32),
                                            patch.scale * multiplier))
                else:
                    if weight is None:
                        weight = module.dequantized_weight(torch.float32)
                    delta = patch.delta(weight, dyn=dyn) * multiplier
                    module.dense_delta = delta if module.dense_delta is None else module.dense_delta + delta
                extra = patch.bias_delta()
                if extra is not None and module.bias is not None:
                    self._write(module.bias, module.bias.detach().float() + extra.to(module.bias.device) * multiplier)
            except (ValueError, RuntimeError) as exc:
                failed.append(f"{patch.target.component}:{patch.target.path}: {exc}")
        return failed

    def _write(self, param: torch.Tensor, value: torch.Tensor) -> None:
        key = id(param)
        if key not in self._backups:
            self._backups[key] = (param, param.detach().to("cpu", copy=True))
        param.data.copy_(value.to(param.dtype))

    @contextmanager
    def suspended(self):
        """The original weights for the length of the block, the merged ones again after it
        (for what must be built from the checkpoint's own weights, such as a Control-LoRA)."""
        if not self._backups:
            yield
            return
        merged = {key: param.detach().to("cpu", copy=True) for key, (param, _) in self._backups.items()}
        with torch.no_grad():
            for param, original in self._backups.values():
                param.data.copy_(original.to(param.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for key, (param, _) in self._backups.items():
                    param.data.copy_(merged[key].to(param.device))

    def restore(self) -> None:
        """Put every changed weight back to its original values."""
        with torch.no_grad():
            while self._backups:
                _, (param, original) = self._backups.popitem()
                param.data.copy_(original.to(param.device))
            while self._stored:
                _, module = self._stored.popitem()
                module.clear_updates()
