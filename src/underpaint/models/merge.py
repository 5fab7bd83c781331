"""A1111's Checkpoint Merger: two or three single-file checkpoints combined tensor by tensor into a new
``.safetensors`` file (``underpaint merge``).

Methods, with ``M`` the multiplier:

* ``weighted-sum``: ``A·(1 − M) + B·M``;
* ``add-difference``: ``A + (B − C)·M`` (C is what B was trained from: "add what B learned to A");
* ``no-interpolation``: A alone, for converting it (``fp16``) or baking a VAE into it.

As in A1111, every tensor of A whose name has ``model`` in it and that B has (C too, for add
difference) is combined; A's other tensors are copied; B's and C's own are left out; CLIP's
``position_ids`` stay A's. An inpainting (9-channel) or instruct-pix2pix (8-channel) A takes a
normal (4-channel) B in its first four input channels, and the result stays an inpainting or
instruct model; the other way round is refused, as A1111 refuses it. Shapes that do not line up
otherwise are refused, naming the tensor.

Tensors are read one at a time (safetensors files are memory-mapped), combined in float32 and
stored in A's dtype (``fp16``: in float16; A1111 combines in the stored dtype). ``bake_vae``
replaces the VAE (``first_stage_model.*``) with a VAE file's; ``discard`` drops the tensors whose
name matches a regular expression. The result records ``sd_merge_recipe`` metadata as A1111's
"Save metadata" does. Only safetensors are read (pickled ``.ckpt`` files are never loaded) and the
file is written atomically, never over an existing one unless asked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import regex
import torch

from ..errors import InvalidParameter, ModelError
from ..imageio.metadata import output_exists, publish, temp_beside
from .hashes import model_hash

METHODS = ("weighted-sum", "add-difference", "no-interpolation")
#: The time ``discard`` may take to match all of a checkpoint's tensor names.
DISCARD_SECONDS = 5.0
#: A1111's key of CLIP's position ids, never combined.
_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
_VAE_PREFIX = "first_stage_model."
#: The UNet's first convolution, whose input channels tell normal, inpainting and instruct models apart.
_INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class MergeRecipe:
    a: Path
    b: Path | None = None
    c: Path | None = None
    method: str = "weighted-sum"
    multiplier: float = 0.3
    fp16: bool = False
    bake_vae: Path | None = None
    discard: str | None = None
    #: The name errors give the ``discard`` field (the HTTP merger's is ``discard_weights``).
    discard_field: str = "discard"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidParameter("method", self.method, "one of " + ", ".join(METHODS))
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) or \
                not -10 <= self.multiplier <= 10:
            raise InvalidParameter("multiplier", self.multiplier, "a number (0 to 1 usually; -10 to 10 taken)")
        if self.method != "no-interpolation" and self.b is None:
            raise InvalidParameter("b", None, f"a checkpoint B for {self.method}")
        if self.method == "add-difference" and self.c is None:
            raise InvalidParameter("c", None, "a checkpoint C for add-difference")
        if self.discard is not None:
            if _repeated_size(self.discard) > MAX_PATTERN_SIZE:
                raise InvalidParameter(self.discard_field, self.discard, f"a regular expression whose repeats "
                                       f"({{m,n}}, nested ones multiplied) come to at most {MAX_PATTERN_SIZE} "
                                       f"(compiling a larger one takes memory in proportion)")
            try:
                regex.compile(self.discard)
            except (regex.error, ValueError) as exc:
                raise InvalidParameter(self.discard_field, self.discard, f"a regular expression ({exc})") from None


def _open(path: Path, role: str):
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: checkpoint {role} must be a .safetensors file (pickled checkpoints are never "
                         "loaded)", field=role.lower())
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise ModelError(f"{path}: checkpoint {role} not found", field=role.lower()) from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own errors for damaged files
        raise ModelError(f"{path}: checkpoint {role} is not a readable safetensors file ({exc})",
                         field=role.lower()) from None


def merge(recipe: MergeRecipe, output: Path, *, overwrite: bool = False,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the merged checkpoint to ``output`` (``.safetensors``); returns its path."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise InvalidParameter("output", str(output), "a .safetensors file name")
    if output.exists() and not overwrite:
        raise output_exists(output)
    output.parent.mkdir(parents=True, exist_ok=True)  # as the other commands make their output's folder
    with ExitStack() as files:
        a = files.enter_context(_open(recipe.a, "A"))
        b = files.enter_context(_open(recipe.b, "B")) if recipe.method != "no-interpolation" else None
        c = files.enter_context(_open(recipe.c, "C")) if recipe.method == "add-difference" else None
        merged = _merged(recipe, a, b, c, progress)
    models = [p for p in (recipe.a, recipe.b, recipe.c) if p is not None]
    hashes = {p: model_hash(p) for p in models}  # each file read once for its hash
    metadata = {"format": "pt", "sd_merge_recipe": json.dumps(_recipe_record(recipe, hashes)),
                "sd_merge_models": json.dumps({hashes[p]: {"name": p.stem} for p in models})}
    temp = temp_beside(output)
    try:
        save_file(merged, str(temp), metadata=metadata)
        publish(temp, output, overwrite=overwrite)
    finally:
        temp.unlink(missing_ok=True)
    return output


def _merged(recipe: MergeRecipe, a, b, c, progress) -> dict[str, torch.Tensor]:
    vae = _vae_tensors(recipe.bake_vae) if recipe.bake_vae is not None else None
    discard = _Discard(recipe.discard, recipe.discard_field) if recipe.discard else None
    b_keys = set(b.keys()) if b is not None else set()
    c_keys = set(c.keys()) if c is not None else set()
    keys = list(a.keys())
    merged: dict[str, torch.Tensor] = {}
    for i, key in enumerate(keys):
        if discard is not None and discard(key):
            continue
        tensor = a.get_tensor(key)
        combine = b is not None and "model" in key and key in b_keys and key != _POSITION_IDS and \
            (c is None or key in c_keys) and tensor.is_floating_point()
        if combine:
            tensor = _combine(key, tensor, b.get_tensor(key), c.get_tensor(key) if c is not None else None, recipe)
        if vae is not None and key.startswith(_VAE_PREFIX) and key in vae:
            tensor = vae[key]
        if recipe.fp16 and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        merged[key] = tensor.contiguous()
        if progress is not None:
            progress(i + 1, len(keys))
    unet = [key for key in keys if key.startswith("model.diffusion_model.")]
    if discard is not None and (not merged or (unet and not any(key in merged for key in unet))):
        raise InvalidParameter(recipe.discard_field, recipe.discard, "a pattern that leaves the UNet's weights "
                                                                      "(this one matches all of them: no checkpoint)")
    if vae is not None:
        for key, tensor in vae.items():  # a VAE A lacked
            merged.setdefault(key, tensor.to(torch.float16) if recipe.fp16 else tensor)
    return merged


def _combine(key: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, recipe: MergeRecipe) -> torch.Tensor:
    m = float(recipe.multiplier)
    if c is not None:
        if b.shape != c.shape:
            raise ModelError(f"{key}: B's shape {tuple(b.shape)} and C's {tuple(c.shape)} differ: B and C must share an "
                             "architecture for add-difference", field="c")
        b = b.float() - c.float()

    def apply(x: torch.Tensor) -> torch.Tensor:
        if c is not None:
            return x.float() + b.float() * m
        return x.float() * (1 - m) + b.float() * m

    if a.shape == b.shape:
        return apply(a).to(a.dtype)
    if key == _INPUT_CONV and a.ndim == 4 and b.ndim == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]:
        if a.shape[1] in (8, 9) and b.shape[1] == 4:  # an inpainting or instruct A: B's four latent channels
            out = a.float().clone()
            out[:, :4] = apply(a[:, :4])
            return out.to(a.dtype)
        if a.shape[1] == 4 and b.shape[1] in (8, 9):
            kind = "inpainting" if b.shape[1] == 9 else "instruct-pix2pix"
            raise ModelError(f"merging an {kind} model with a normal one: the {kind} model must be A", field="a")
    raise ModelError(f"{key}: A's shape {tuple(a.shape)} and B's {tuple(b.shape)} differ (checkpoints of different "
                     "architectures cannot be merged)", field="b")


#: The most a discard pattern may spell out once its ``{m,n}`` repeats are expanded (``(a{1000}){1000}``
#: compiles to hundreds of MB, ``a{1000000000}`` to more than a machine has).
MAX_PATTERN_SIZE = 10_000
_REPEAT = regex.compile(r"\{(\d*)(?:,(\d*))?\}")


def _repeated_size(pattern: str) -> int:
    """An upper bound on the atoms a pattern spells out with its counted repeats expanded: each atom 1, a
    group the sum of its contents, ``{m,n}`` multiplying what it follows by its larger number."""
    totals, last, i = [0], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i, last = i + 2, 1
        elif c == "[":  # a class: one atom, to its closing bracket
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, last = j + 1, 1
        elif c == "(":
            totals.append(0)
            i, last = i + 1, 0
            continue
        elif c == ")" and len(totals) > 1:
            last = totals.pop()
            i += 1
        elif c == "{" and (found := _REPEAT.match(pattern, i)) and (found.group(1) or found.group(2)):
            count = max(int(n) for n in found.groups() if n)
            if count > MAX_PATTERN_SIZE:
                return count
            totals[-1] += last * (count - 1)
            last *= count
            i = found.end()
            if totals[-1] > MAX_PATTERN_SIZE:
                return totals[-1]
            continue
        else:
            i, last = i + 1, 1
        totals[-1] += last
    return sum(totals)


class _Discard:
    """``discard`` matched against tensor names (``search``, as A1111), within :data:`DISCARD_SECONDS` in all:
    a pattern that backtracks without end is refused instead of holding the merge (and a server's queue)."""

    def __init__(self, pattern: str, field: str):
        self.pattern, self.field = regex.compile(pattern), field
        self.deadline = time.monotonic() + DISCARD_SECONDS

    def __call__(self, key: str) -> bool:
        try:
            return self.pattern.search(key, timeout=max(0.001, self.deadline - time.monotonic())) is not None
        except TimeoutError:
            raise InvalidParameter(self.field, self.pattern.pattern, f"a regular expression that matches the "
                                   f"tensor names within {DISCARD_SECONDS:g} s") from None


def is_inpainting(path: Path) -> bool:
    """A checkpoint whose UNet takes 9 input channels (a safetensors file's header is read, nothing else)."""
    from .header import read_header

    try:
        info = read_header(path).tensors.get(_INPUT_CONV)
    except ModelError:
        return False
    return info is not None and len(info.shape) == 4 and info.shape[1] == 9


def _vae_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A VAE file's tensors under a checkpoint's ``first_stage_model.`` names (original-layout VAE files,
    with or without the prefix)."""
    with _open(path, "VAE") as source:
        keys = list(source.keys())
        if not any(k.startswith(("encoder.", "decoder.", _VAE_PREFIX)) for k in keys):
            raise ModelError(f"{path}: not a VAE in the original layout (encoder.*/decoder.*)", field="bake_vae")
        return {key if key.startswith(_VAE_PREFIX) else _VAE_PREFIX + key: source.get_tensor(key)
                for key in keys if not key.startswith(("model_ema.", "loss."))}


def _recipe_record(recipe: MergeRecipe, hashes: dict[Path, str]) -> dict:
    return {"type": "webui", "primary_model_hash": hashes.get(recipe.a), "secondary_model_hash": hashes.get(recipe.b),
            "tertiary_model_hash": hashes.get(recipe.c),
            "interp_method": {"weighted-sum": "Weighted sum", "add-difference": "Add difference",
                              "no-interpolation": "No interpolation"}[recipe.method],
            "multiplier": recipe.multiplier, "save_as_half": recipe.fp16,
            "custom_name": None, "config_source": 0,
            "bake_in_vae": recipe.bake_vae.name if recipe.bake_vae else None,
            "discard_weights": recipe.discard or "", "is_inpainting": None, "is_instruct_pix2pix": None}
