"""A1111's script "X/Y/Z plot": one picture per combination of up to three varied settings, laid
out in a labelled grid.

Each axis has a type (A1111's names: "CFG Scale", "Steps", "Prompt S/R", ...) and a
comma-separated list of values, read as A1111 1.10 reads them:

- the list is CSV: a value may be quoted ("a, b" is one value) and surrounding spaces go;
- whole-number axes take ranges: ``1-5`` (1 to 5 inclusive), ``1-10 (+2)`` (a signed step: 1, 3,
  5, 7, 9), ``1-10 [4]`` (4 evenly spaced values, each cut to a whole number: 1, 4, 7, 10);
- number axes alike with decimals: ``5-9 (+0.5)`` (5 to 9 in steps of 0.5), ``3-7 [5]``.

Every cell (the request with the X, Y and Z values applied, in that order) is one ordinary
request: the same batch settings, its own LoRA merge, its own infotext. Cells run Z by Z, row by
row, left to right, except that an axis that loads models runs outermost, as A1111 orders them by
cost: a "Checkpoint name" axis first, then a "VAE" axis (see "Switching models" below). Unless "Keep -1 for seeds" (``no_fixed_seeds``), a -1 seed (and variation
seed, and a -1 on a Seed axis) is fixed once, so every cell shares it; ``vary_seeds_x/y/z`` add
the cell's index along that axis to it, so all cells differ when all three are on (X index, plus
Y index times the X count, plus Z index times the X and Y counts).

The result, as A1111 returns it: the grid (with one Z value) or, with several, a grid of the Z
values' grids side by side under their labels, followed by those grids when
``include_sub_grids``; then, with ``include_lone_images``, each cell's picture. A grid shows the
first picture of each cell, with X labels above the columns and Y labels left of the rows when
``draw_legend`` (wrapped to the column width, or to three quarters of it left of the rows; font
size (width + height) // 25 of a cell), and ``margin_size`` pixels between the pictures (with the
legend only, as in A1111). A grid's infotext is its first cell's.

Switching models: a "Checkpoint name" axis runs each cell on the checkpoint its value names (as
the server's /sdapi/v1/sd-models lists them, or as the CLI's ``--model`` takes them; labelled with
the value alone, without a folder), with the VAE the request would pick for that checkpoint; a
"VAE" axis ("Automatic", "None" or a VAE's name; labelled "VAE: <value>") swaps only the VAE's
weights into the running model. The cells run the loading axis outermost, so each checkpoint is
loaded once per value and each VAE swapped once per value within it, while the grid, the order of
the cells in the result, the seeds and the progress count stay as with any other axis. Only
whoever holds the models can switch them: the server and the CLI pass :func:`run` a
:class:`ModelNames` to look the values up and run each cell on its models (:class:`Cell`'s
``checkpoint`` and ``vae``); ``Engine.generate`` runs one model and refuses these axes. After the
plot the server's next job runs on the checkpoint selected before it, as A1111 restores it.

Where underpaint differs: a value a cell cannot take (a step count of 0, an unknown sampler, a
Prompt S/R search string absent from the prompts, a checkpoint or VAE name that is not listed) is
refused before the first cell runs, where A1111 leaves that cell black; with ``no_fixed_seeds``
the vary options leave -1 seeds random.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParameter, UnknownName

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..params import GenerationParams, XYZPlotOptions
    from .records import Progress, Result

#: A1111 1.10's axis types in its order, each with the tab it is limited to (None: both). The
#: API's ``script_args`` name an axis by its index in the list of its tab (:func:`axis_names`).
A1111_AXES: tuple[tuple[str, str | None], ...] = (
    ("Nothing", None), ("Seed", None), ("Var. seed", None), ("Var. strength", None), ("Steps", None),
    ("Hires steps", "txt2img"), ("CFG Scale", None), ("Image CFG Scale", "img2img"), ("Prompt S/R", None),
    ("Prompt order", None), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
    ("Checkpoint name", None), ("Negative Guidance minimum sigma", None), ("Sigma Churn", None),
    ("Sigma min", None), ("Sigma max", None), ("Sigma noise", None), ("Schedule type", None),
    ("Schedule min sigma", None), ("Schedule max sigma", None), ("Schedule rho", None),
    ("Beta schedule alpha", None), ("Beta schedule beta", None), ("Eta", None), ("Clip skip", None),
    ("Denoising", None), ("Initial noise multiplier", None), ("Extra noise", None), ("Hires upscaler", "txt2img"),
    ("Cond. Image Mask Weight", "img2img"), ("VAE", None), ("Styles", None), ("UniPC Order", None),
    ("Face restore", None), ("Token merging ratio", None), ("Token merging ratio high-res", None),
    ("Always discard next-to-last sigma", None), ("SGM noise multiplier", None), ("Refiner checkpoint", None),
    ("Refiner switch at", None), ("RNG source", None), ("FP8 mode", None), ("Size", None),
)

#: How a label reads: "named" is "CFG Scale: 7.0", "plain" the value alone, "file" the value
#: without a folder ("sd/model.safetensors" reads "model.safetensors"), "none" nothing, "joined"
#: the parts of a value joined by ", " (Prompt order).
_NAMED, _PLAIN, _FILE, _NONE, _JOINED = "named", "plain", "file", "none", "joined"
#: What a loading axis switches (:attr:`Axis.loads`); REFINER: the request's refiner checkpoint.
CHECKPOINT, VAE, REFINER = "checkpoint", "vae", "refiner"


@dataclass(frozen=True)
class Axis:
    """One axis type underpaint runs: the values' type, how a value changes a request, the label."""

    name: str
    kind: type
    apply: Callable[["GenerationParams", Any, Any], "GenerationParams"]
    label: str = _NAMED
    #: "txt2img" or "img2img" where A1111 offers the axis on one tab only.
    tab: str | None = None
    #: The axis changes hires. fix settings: the request needs hires. fix on.
    hires: bool = False
    #: What the axis switches between cells (CHECKPOINT or VAE), None: only the request changes.
    loads: str | None = None
    #: A1111's cost of changing the value: the costliest axis runs outermost (a checkpoint load
    #: costs most, a VAE swap less, anything else nothing).
    cost: float = 0.0


def _field(name: str) -> Callable:
    return lambda p, value, first: p.replace(**{name: value})


def _hires(name: str) -> Callable:
    return lambda p, value, first: p.replace(hires=replace(p.hires, **{name: value}))


def _same(p: "GenerationParams", value, first) -> "GenerationParams":
    return p


def _prompt_sr(p: "GenerationParams", value: str, first: str) -> "GenerationParams":
    for name, text in (("prompt", p.prompt), ("negative prompt", p.negative_prompt)):
        # the length is known before the text is made: axes of replacements each longer than what they
        # replace multiply a prompt's length
        if first and len(text) + text.count(first) * (len(value) - len(first)) > MAX_PROMPT_CHARS:
            raise InvalidParameter("prompt", f"{value[:40]!r} for {first[:40]!r}",
                                   f"replacements that keep the {name} within {MAX_PROMPT_CHARS} characters")
    return p.replace(prompt=p.prompt.replace(first, value), negative_prompt=p.negative_prompt.replace(first, value))


def _eta(p: "GenerationParams", value: float, first) -> "GenerationParams":
    return p.replace(sampler_options=replace(p.sampler_options, eta=value))


def _sampler_option(name: str) -> Callable:
    return lambda p, value, first: p.replace(sampler_options=replace(p.sampler_options, **{name: value}))


def _boolean(text: str) -> bool:
    if str(text).strip().lower() in ("true", "false"):
        return str(text).strip().lower() == "true"
    raise InvalidParameter("xyz_values", text, "True or False")


def _discard_penultimate(p: "GenerationParams", value: str, first) -> "GenerationParams":
    return p.replace(sampler_options=replace(p.sampler_options, discard_penultimate_sigma=_boolean(value)))


def _rng(p: "GenerationParams", value: str, first) -> "GenerationParams":
    sources = {"gpu": "gpu", "cpu": "cpu", "nv": "nv"}
    if str(value).strip().lower() not in sources:
        raise InvalidParameter("xyz_values", value, "GPU, CPU or NV")
    return p.replace(rng=sources[str(value).strip().lower()])


def _face_restore(p: "GenerationParams", value: str, first) -> "GenerationParams":
    """A1111's "Face restore": CodeFormer or GFPGAN restore faces with that restorer, True with the
    request's, False not at all."""
    word = str(value).strip().lower()
    if word in ("codeformer", "gfpgan"):
        return p.replace(restore_faces=True, face_restoration_model=value.strip())
    if word in ("true", "false"):
        return p.replace(restore_faces=word == "true")
    raise InvalidParameter("xyz_values", value, "CodeFormer, GFPGAN, True or False")


def _styles(p: "GenerationParams", value: str, first, book=None) -> "GenerationParams":
    """A1111's "Styles": the value's styles (comma-separated names of ``book``'s) applied to the prompts,
    after the request's own, in order."""
    if book is None:
        raise InvalidParameter("xyz_values", value, "a style's name, from a styles file (none was given)")
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    prompt, negative = book.apply(names, p.prompt, p.negative_prompt, field="xyz_values")
    return p.replace(prompt=prompt, negative_prompt=negative)


def _sgm(p: "GenerationParams", value: str, first) -> "GenerationParams":
    return p.replace(sgm_noise_multiplier=_boolean(value))


def _unipc_order(p: "GenerationParams", value: int, first) -> "GenerationParams":
    """A1111 keeps the order below the steps' count."""
    return p.replace(sampler_options=replace(p.sampler_options, unipc_order=max(1, min(value, p.steps - 1))))


def _size(p: "GenerationParams", value: str, first) -> "GenerationParams":
    """A1111's "Size": WIDTHxHEIGHT, the picture's size (img2img: the size it is resized to)."""
    width, sep, height = str(value).partition("x")
    try:
        if not sep:
            raise ValueError(value)
        return p.replace(width=int(width.strip()), height=int(height.strip()))
    except ValueError:
        raise InvalidParameter("xyz_values", value, "WIDTHxHEIGHT, e.g. 512x768") from None


def _mask_weight(p: "GenerationParams", value: float, first) -> "GenerationParams":
    return p.replace(inpaint=replace(p.inpaint, mask_weight=value))


def _refiner_switch(p: "GenerationParams", value: float, first) -> "GenerationParams":
    if p.refiner is None:
        raise InvalidParameter("xyz_values", value, "a request with a refiner (Refiner switch at varies its switch)")
    return p.replace(refiner=replace(p.refiner, switch_at=value))


def _prompt_order(p: "GenerationParams", value: tuple[str, ...], first) -> "GenerationParams":
    """A1111's "Prompt order": the parts, wherever they stand in the prompt, rewritten in this order
    (the first place any of them takes gets the order's first part, and so on)."""
    rest, pieces = p.prompt, []
    places = sorted((rest.find(part), part) for part in value)
    for position, part in places:
        if position < 0:
            raise InvalidParameter("xyz_values", part, "parts that are all in the prompt")
    for _, part in places:
        at = rest.find(part)
        pieces.append(rest[:at])
        rest = rest[at + len(part):]
    return p.replace(prompt="".join(piece + part for piece, part in zip(pieces, value)) + rest)


def _denoising(p: "GenerationParams", value: float, first) -> "GenerationParams":
    """img2img's denoising strength; in txt2img A1111's field is the hires. fix pass's."""
    if p.is_img2img:
        return p.replace(strength=value)
    return p.replace(hires=replace(p.hires, strength=value))


AXES: dict[str, Axis] = {a.name.lower(): a for a in (
    Axis("Nothing", str, _same, label=_NONE),
    Axis("Seed", int, _field("seed")),
    Axis("Var. seed", int, _field("subseed")),
    Axis("Var. strength", float, _field("subseed_strength")),
    Axis("Steps", int, _field("steps")),
    Axis("Hires steps", int, _hires("steps"), tab="txt2img", hires=True),
    Axis("CFG Scale", float, _field("cfg_scale")),
    Axis("Image CFG Scale", float, _field("image_cfg_scale"), tab="img2img"),
    Axis("Prompt S/R", str, _prompt_sr, label=_PLAIN),
    Axis("Prompt order", str, _prompt_order, label=_JOINED),
    Axis("Sampler", str, _field("sampler"), label=_PLAIN),
    Axis("Hires sampler", str, _hires("sampler"), tab="txt2img", hires=True),
    Axis("Checkpoint name", str, _same, label=_FILE, loads=CHECKPOINT, cost=1.0),
    Axis("Negative Guidance minimum sigma", float, _field("s_min_uncond")),
    Axis("Sigma Churn", float, _sampler_option("s_churn")),
    Axis("Sigma min", float, _sampler_option("s_tmin")),
    Axis("Sigma max", float, _sampler_option("s_tmax")),
    Axis("Sigma noise", float, _sampler_option("s_noise")),
    Axis("Schedule type", str, _field("scheduler")),
    Axis("Schedule min sigma", float, _sampler_option("sigma_min")),
    Axis("Schedule max sigma", float, _sampler_option("sigma_max")),
    Axis("Schedule rho", float, _sampler_option("rho")),
    Axis("Beta schedule alpha", float, _sampler_option("beta_alpha")),
    Axis("Beta schedule beta", float, _sampler_option("beta_beta")),
    Axis("Eta", float, _eta),
    Axis("Clip skip", int, _field("clip_skip")),
    Axis("Denoising", float, _denoising),
    Axis("Initial noise multiplier", float, _field("noise_multiplier")),
    Axis("Extra noise", float, _field("extra_noise")),
    Axis("Hires upscaler", str, _hires("upscaler"), tab="txt2img", hires=True),
    Axis("Cond. Image Mask Weight", float, _mask_weight, tab="img2img"),
    Axis("VAE", str, _same, loads=VAE, cost=0.7),
    Axis("Styles", str, _styles),
    Axis("UniPC Order", int, _unipc_order),
    Axis("Face restore", str, _face_restore),
    Axis("Token merging ratio", float, _field("token_merging_ratio")),
    Axis("Token merging ratio high-res", float, _hires("token_merging_ratio"), hires=True),
    Axis("Always discard next-to-last sigma", str, _discard_penultimate),
    Axis("SGM noise multiplier", str, _sgm),
    Axis("Refiner checkpoint", str, _same, label=_FILE, loads=REFINER, cost=0.9),
    Axis("Refiner switch at", float, _refiner_switch),
    Axis("RNG source", str, _rng),
    Axis("Size", str, _size),
)}


def axis_names(img2img: bool) -> list[str]:
    """A1111 1.10's axis list on the txt2img or the img2img tab (the API's axis indexes)."""
    tab = "img2img" if img2img else "txt2img"
    return [name for name, only in A1111_AXES if only in (None, tab)]


def axis(name: str, field: str = "xyz_x_type") -> Axis:
    """The axis type called ``name`` (A1111's spelling, matched without regard to case)."""
    found = AXES.get(str(name).strip().lower()) if isinstance(name, str) else None
    if found is None:
        if isinstance(name, str) and any(name.strip().lower() == known.lower() for known, _ in A1111_AXES):
            raise InvalidParameter(field, name, "an axis type underpaint runs: " + ", ".join(a.name for a in AXES.values()))
        raise UnknownName(field, name, [a.name for a in AXES.values()])
    return found


# Ranges as A1111 writes them: "1-5", "1-10 (+2)" (the step carries its sign), "1-10 [4]".
_NUMBER = r"[+-]?\s*\d+"
_DECIMAL = r"[+-]?\s*\d+(?:\.\d*)?"
_INT_STEP = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})(?:\s*\(\s*([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*\[\s*(\d+)\s*\]\s*")
_FLOAT_STEP = re.compile(rf"\s*({_DECIMAL})\s*-\s*({_DECIMAL})(?:\s*\(\s*([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_FLOAT_COUNT = re.compile(rf"\s*({_DECIMAL})\s*-\s*({_DECIMAL})\s*\[\s*(\d+)\s*\]\s*")

#: The most values one axis may expand to (a range such as 1-100000 is refused, not run).
MAX_AXIS_VALUES = 1000
#: The most cells a plot may have (x values times y values times z values), checked before any is made.
MAX_CELLS = 10_000
#: The longest prompt Prompt S/R may make.
MAX_PROMPT_CHARS = 100_000


def split_values(text: str) -> list[str]:
    """A CSV list (several lines allowed), each value without surrounding spaces."""
    return [value.strip() for row in csv.reader(io.StringIO(text)) for value in row]


def _number(text: str) -> str:
    return text.replace(" ", "")


def _expand(value: str, kind: type) -> list | None:
    """The values a range stands for, or None when ``value`` is not a range."""
    if kind is int:
        step = _INT_STEP.fullmatch(value)
        count = _INT_COUNT.fullmatch(value)
        if step:
            start, end = int(_number(step[1])), int(_number(step[2]))
            by = int(step[3]) if step[3] else 1
            if by == 0:
                return None
            return list(range(start, end + 1, by)[:MAX_AXIS_VALUES + 1])  # a range is sliced without making it
        if count:
            start, end, n = int(_number(count[1])), int(_number(count[2])), int(count[3])
            return [int(v) for v in _linspace(start, end, min(n, MAX_AXIS_VALUES + 1))]
        return None
    step = _FLOAT_STEP.fullmatch(value)
    count = _FLOAT_COUNT.fullmatch(value)
    if step:
        start, end = float(_number(step[1])), float(_number(step[2]))
        by = float(step[3]) if step[3] else 1.0
        if by == 0:
            return None
        # numpy.arange(start, end + step, step), as A1111: the end is included when the steps reach it
        n = max(0, math.ceil((end + by - start) / by))
        return [start + i * by for i in range(min(n, MAX_AXIS_VALUES + 1))]
    if count:
        start, end, n = float(_number(count[1])), float(_number(count[2])), int(count[3])
        return _linspace(start, end, min(n, MAX_AXIS_VALUES + 1))
    return None


def _linspace(start: float, end: float, n: int) -> list[float]:
    """``n`` evenly spaced values from ``start`` to ``end`` (both included), as numpy.linspace."""
    if n == 1:
        return [float(start)]
    step = (end - start) / (n - 1)
    return [float(end) if i == n - 1 else start + i * step for i in range(n)]


_KIND_WORDS = {int: "whole numbers or ranges (1-5, 1-10 (+2), 1-10 [4])",
               float: "numbers or ranges (5-9 (+0.5), 3-7 [5])", str: "values"}


def parse_axis_values(axis_type: str, values: "str | list | tuple", *, field: str = "xyz_x_values") -> list:
    """The values of an axis of type ``axis_type`` from its text (or from a list of values, as
    A1111's value dropdowns send them), ranges expanded and converted to the axis's type.

    Nothing has the single value None. A value that is neither of the axis's type nor a range, or
    no value at all, is an :class:`InvalidParameter` naming ``field`` and the axis type.
    """
    kind = axis(axis_type, field.replace("_values", "_type"))
    if kind.name == "Nothing":
        return [None]
    if isinstance(values, str):
        items = split_values(values)
    elif isinstance(values, (list, tuple)):
        items = [str(v).strip() for v in values]
    else:
        raise InvalidParameter(field, values, f"a comma-separated list of {_KIND_WORDS[kind.kind]} for {kind.name}")
    out: list = []
    for item in items:
        if kind.kind is str:
            out.append(item)
            continue
        expanded = _expand(item, kind.kind)
        if expanded is None:
            try:
                expanded = [kind.kind(_number(item))]
            except ValueError:
                raise InvalidParameter(field, item, f"{_KIND_WORDS[kind.kind]} for {kind.name}") from None
        out += expanded
        if len(out) > MAX_AXIS_VALUES:
            raise InvalidParameter(field, values, f"at most {MAX_AXIS_VALUES} values for {kind.name}")
    if not out:
        raise InvalidParameter(field, values, f"at least one value for {kind.name} (a range that runs "
                                              "backwards needs a negative step, e.g. 10-1 (-3))")
    if kind.name == "Prompt order":  # the values are the prompt's parts; each order of them is a cell
        if math.factorial(len(out)) > MAX_AXIS_VALUES:
            raise InvalidParameter(field, values, f"at most 6 parts for Prompt order ({len(out)} make "
                                                  f"{math.factorial(len(out))} orders)")
        return [tuple(order) for order in itertools.permutations(out)]
    return out


def label(axis_type: str, value) -> str:
    """A value's grid label as A1111 writes it: "CFG Scale: 7.0" (numbers to 8 decimals at most),
    the value alone for Prompt S/R and Sampler, a Checkpoint name without its folder, nothing for
    Nothing."""
    kind = axis(axis_type)
    if isinstance(value, float):
        value = round(value, 8)
    if kind.label == _NONE:
        return ""
    if kind.label == _FILE:
        return str(value).replace("\\", "/").rsplit("/", 1)[-1]
    if kind.label == _JOINED:
        return ", ".join(value)
    return str(value) if kind.label == _PLAIN else f"{kind.name}: {value}"


@dataclass(frozen=True)
class ModelNames:
    """How the values of the axes that switch models are looked up, given by whoever can switch
    them (the server: its models folder's listing; the CLI: what ``--model`` and ``--vae`` take).

    ``checkpoint(value, field)`` is the checkpoint a "Checkpoint name" value names, ``vae(value,
    field)`` the VAE choice a "VAE" value names ("Automatic", "None" or a VAE); each raises an
    :class:`InvalidParameter` naming ``field`` for a name it does not know.
    """

    checkpoint: Callable[[str, str], Any]
    vae: Callable[[str, str], Any]


@dataclass(frozen=True)
class Cell:
    """One picture of the plot: its place on the axes (indexes and values) and its request, and the
    checkpoint and VAE choice its "Checkpoint name" and "VAE" values name (None: the request's)."""

    ix: int
    iy: int
    iz: int
    params: "GenerationParams"
    checkpoint: Any = None
    vae: Any = None


@dataclass(frozen=True)
class Plan:
    """The axes' values and every cell's request, laid out Z by Z, row by row (the grid's order),
    and ``order``: the cells' indexes in the order they run (the loading axes outermost)."""

    xs: list
    ys: list
    zs: list
    cells: list[Cell]
    order: list[int]

    @property
    def switches_models(self) -> bool:
        return any(cell.checkpoint is not None or cell.vae is not None for cell in self.cells)


_SEED_AXES = ("Seed", "Var. seed")


def switches_models(params: "GenerationParams") -> bool:
    """Whether the request's script runs parts of it on other models: an X/Y/Z plot's Checkpoint
    name or VAE axis, or a Prompts from file line's ``--sd_model``; only the server and the CLI,
    which hold the models, run those."""
    if params.xyz_plot is not None:
        return bool(loading_axes(params.xyz_plot))
    if params.prompts_from_file is not None:
        from .prompts_file import switches_models as lines_switch

        return lines_switch(params.prompts_from_file)
    return False


def loading_axes(options: "XYZPlotOptions") -> list[tuple[str, Axis]]:
    """The axes of ``options`` that switch models between cells, with their letters."""
    found = []
    for letter in "xyz":
        kind = axis(getattr(options, f"{letter}_type"), f"xyz_{letter}_type")
        if kind.loads is not None:
            found.append((letter, kind))
    return found


def plan(params: "GenerationParams", models: ModelNames | None = None, *, max_cells: int = MAX_CELLS) -> Plan:
    """Check the plot against its request and make each cell's request (seeds fixed unless
    ``no_fixed_seeds``). Every refusal comes here, before any cell runs, naming the axis's field;
    more than ``max_cells`` cells are refused before any cell's request is made.

    ``models`` looks up the "Checkpoint name" and "VAE" values; without it (``Engine.generate``,
    which holds one model) those axes are refused."""
    options = params.xyz_plot
    assert options is not None
    base = params.replace(xyz_plot=None)
    if not options.no_fixed_seeds:
        base = base.with_seed()
    axes, values, looked_up = [], [], []
    for letter in "xyz":
        kind = axis(getattr(options, f"{letter}_type"), f"xyz_{letter}_type")
        if kind.name == "Styles":  # its values name styles of the plot's styles file
            kind = replace(kind, apply=partial(_styles, book=options.styles))
        vals = parse_axis_values(kind.name, getattr(options, f"{letter}_values"), field=f"xyz_{letter}_values")
        _check_axis(kind, vals, base, letter)
        if kind.name in _SEED_AXES and not options.no_fixed_seeds:
            vals = [_random_seed() if v == -1 else v for v in vals]
        axes.append(kind)
        values.append(vals)
        looked_up.append(_look_up(kind, vals, letter, models))
    xs, ys, zs = values
    if len(xs) * len(ys) * len(zs) > max_cells:
        raise TooManyCells(len(xs) * len(ys) * len(zs), max_cells)
    cells = []
    for iz, z in enumerate(zs):
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                index = (ix, iy, iz)
                found = {kind.loads: names[i] for kind, names, i in zip(axes, looked_up, index) if kind.loads}
                cell_params = _cell_params(base, options, axes, values, index)
                if REFINER in found:  # "None": no refiner in this cell
                    from ..params import RefinerOptions

                    refiner = found[REFINER]
                    switch_at = cell_params.refiner.switch_at if cell_params.refiner is not None else 0.8
                    cell_params = cell_params.replace(
                        refiner=None if refiner is None else RefinerOptions(str(refiner), switch_at))
                cells.append(Cell(ix, iy, iz, cell_params, checkpoint=found.get(CHECKPOINT), vae=found.get(VAE)))
    return Plan(xs, ys, zs, cells, _run_order(axes, (len(xs), len(ys), len(zs))))


class TooManyCells(InvalidParameter):
    """A plot of more cells than allowed (``cells``), refused before any cell is made."""

    def __init__(self, cells: int, most: int):
        super().__init__("xyz_x_values", f"{cells} cells", f"at most {most} cells in all")
        self.cells = cells


def _look_up(kind: Axis, values: list, letter: str, models: ModelNames | None) -> list | None:
    """What each value of a loading axis names (the same names once each), or None for another axis."""
    if kind.loads is None:
        return None
    field = f"xyz_{letter}_values"
    if kind.loads == REFINER:  # None for "None"; names as the models folder resolves them, listed ones only with models
        from ..params import names_no_checkpoint

        def find_refiner(value: str, field: str):
            if names_no_checkpoint(value):
                return None
            return value if models is None else models.checkpoint(value, field)

        return [find_refiner(value, field) for value in values]
    if models is None:
        raise InvalidParameter(f"xyz_{letter}_type", kind.name,
                               "an axis that runs on one model: the Checkpoint name and VAE axes switch models "
                               "between cells, which the server (underpaint serve, the API) and the CLI "
                               "(underpaint txt2img/img2img --xyz-x ...) do; Engine.generate holds one model")
    find = models.checkpoint if kind.loads == CHECKPOINT else models.vae
    seen: dict[str, Any] = {}
    for value in values:
        if value not in seen:
            seen[value] = find(value, field)
    return [seen[value] for value in values]


def _run_order(axes: list[Axis], counts: tuple[int, int, int]) -> list[int]:
    """The cells' indexes (in the grid's order: Z, then Y, then X) in the order they run: the
    costliest axis outermost, then the next; axes of equal cost keep the grid's order (Z, Y, X)."""
    nx, ny, nz = counts
    nesting = sorted((2, 1, 0), key=lambda k: -axes[k].cost)  # outermost first; sorted() keeps ties' order
    order = []

    def walk(depth: int, index: list[int]) -> None:
        if depth == 3:
            ix, iy, iz = index
            order.append((iz * ny + iy) * nx + ix)
            return
        for i in range(counts[nesting[depth]]):
            index[nesting[depth]] = i
            walk(depth + 1, index)

    walk(0, [0, 0, 0])
    return order


def _random_seed() -> int:
    from ..params import random_seed

    return random_seed()


def _check_axis(kind: Axis, values: list, p: "GenerationParams", letter: str) -> None:
    field = f"xyz_{letter}_type"
    tab = "img2img" if p.is_img2img else "txt2img"
    if kind.tab is not None and kind.tab != tab:
        raise InvalidParameter(field, kind.name, f"an axis of the {tab} tab ({kind.name} is {kind.tab} only)")
    if kind.hires and p.hires is None:
        raise InvalidParameter(field, kind.name, "hires. fix on (the axis changes its settings)")
    if kind.name == "Denoising" and not p.is_img2img and p.hires is None:
        raise InvalidParameter(field, kind.name, "img2img, or txt2img with hires. fix on (Denoising sets the "
                                                 "hires pass's strength there)")
    if kind.name == "Prompt S/R" and values[0] not in p.prompt and values[0] not in p.negative_prompt:
        raise InvalidParameter(f"xyz_{letter}_values", values[0], "a search string found in the prompt or the "
                                                                 "negative prompt (Prompt S/R replaces its first value)")


def _cell_params(base: "GenerationParams", options: "XYZPlotOptions", axes: list[Axis], values: list[list],
                 index: tuple[int, int, int]) -> "GenerationParams":
    p = base
    for letter, kind, vals, i in zip("xyz", axes, values, index):
        try:
            p = kind.apply(p, vals[i], vals[0])
        except InvalidParameter as exc:
            raise InvalidParameter(f"xyz_{letter}_values", vals[i],
                                   f"a value {kind.name} can take ({exc.field}: {exc.expected})") from None
    if p.seed != -1:
        nx = len(values[0]) if options.vary_seeds_x else 1
        ny = len(values[1]) if options.vary_seeds_y else 1
        ix, iy, iz = index
        offset = (ix if options.vary_seeds_x else 0) + (iy * nx if options.vary_seeds_y else 0) + \
            (iz * nx * ny if options.vary_seeds_z else 0)
        if offset:
            p = p.replace(seed=p.seed + offset)
    return p


# --- The grid --------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=max(1, size))


def _wrap(text: str, font, width: int) -> list[str]:
    """Words laid on lines no wider than ``width`` (a word wider than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


@dataclass(frozen=True)
class Annotation:
    """One text of a grid label: black when ``active``, else grey and struck through (the Prompt
    matrix's labels list every part, the ones its column or row leaves out struck through)."""

    text: str
    active: bool = True


#: A grid label: a text, or texts one under the other (:class:`Annotation`).
Label = "str | list[Annotation]"
_INACTIVE = (153, 153, 153)


def _label_lines(label: Label, font, width: int) -> list[Annotation]:
    """A label's lines, each annotation wrapped to ``width`` on lines of its own."""
    parts = [Annotation(label)] if isinstance(label, str) else label
    return [Annotation(line, part.active) for part in parts for line in _wrap(part.text, font, width)]


def _text_height(lines: list[Annotation], font, spacing: int) -> int:
    if not lines:
        return 0
    return sum(font.getbbox(line.text)[3] - font.getbbox(line.text)[1] for line in lines) + spacing * (len(lines) - 1)


def _draw_lines(draw, lines: list[Annotation], centre_x: float, top: float, font, size: int, width: int,
                spacing: int) -> None:
    """Each line centred on ``centre_x``, shrunk until it fits ``width``; an inactive one grey with a
    line through it."""
    for line in lines:
        fnt, fs = font, size
        while fs > 1 and fnt.getlength(line.text) > width:
            fs -= 1
            fnt = _font(fs)
        height = fnt.getbbox(line.text)[3] - fnt.getbbox(line.text)[1]
        colour = (0, 0, 0) if line.active else _INACTIVE
        draw.text((centre_x, top + height / 2), line.text, font=fnt, fill=colour, anchor="mm")
        if not line.active:
            half = font.getlength(line.text) // 2
            draw.line((centre_x - half, top + height // 2, centre_x + half, top + height // 2), fill=_INACTIVE,
                      width=4)
        top += height + spacing


def batch_grid(pictures: list["Image"]) -> "Image":
    """A1111's grid of a batch's pictures (its default "rows: -1"): round(√n) rows, as many columns as
    they need, side by side on black in order, row by row."""
    rows = min(len(pictures), max(1, round(math.sqrt(len(pictures)))))
    return draw_grid(pictures, math.ceil(len(pictures) / rows), [], [], legend=False)


def draw_grid(pictures: list["Image"], columns: int, column_labels: list[Label], row_labels: list[Label], *,
              margin: int = 0, legend: bool = True) -> "Image":
    """``pictures`` (row by row, all the first one's size) in a grid of ``columns`` columns.

    Without ``legend``: the pictures side by side on black, nothing between them. With it, A1111's
    annotated grid on white: ``margin`` pixels between the pictures, the column labels in a band
    above (as high as the tallest label plus a font size) and the row labels in a band to the left,
    three quarters of a picture wide; a band whose labels are all empty is left out. A label is a
    text or a list of :class:`Annotation` lines.
    """
    from PIL import Image, ImageDraw

    w, h = pictures[0].size
    rows = math.ceil(len(pictures) / columns)
    if not legend:
        grid = Image.new("RGB", (columns * w, rows * h))
        for i, picture in enumerate(pictures):
            grid.paste(picture.convert("RGB"), (i % columns * w, i // columns * h))
        return grid
    size = (w + h) // 25
    spacing = size // 2
    font = _font(size)
    pad_left = w * 3 // 4 if any(_label_lines(text, font, w) for text in row_labels) else 0
    column_lines = [_label_lines(text, font, w) for text in column_labels]
    row_lines = [_label_lines(text, font, pad_left) for text in row_labels]
    column_heights = [_text_height(lines, font, spacing) for lines in column_lines]
    pad_top = max(column_heights) + 2 * spacing if any(column_heights) else 0
    grid = Image.new("RGB", (pad_left + columns * w + margin * (columns - 1), pad_top + rows * h + margin * (rows - 1)),
                     (255, 255, 255))
    for i, picture in enumerate(pictures):
        grid.paste(picture.convert("RGB"), cell_origin(i % columns, i // columns, (w, h), pad_left, pad_top, margin))
    draw = ImageDraw.Draw(grid)
    for col, lines in enumerate(column_lines):
        x = pad_left + (w + margin) * col + w / 2
        _draw_lines(draw, lines, x, pad_top / 2 - column_heights[col] / 2, font, size, w, spacing)
    for row, lines in enumerate(row_lines):
        y = pad_top + (h + margin) * row + h / 2 - _text_height(lines, font, spacing) / 2
        _draw_lines(draw, lines, pad_left / 2, y, font, size, pad_left, spacing)
    return grid


def cell_origin(col: int, row: int, size: tuple[int, int], pad_left: int, pad_top: int, margin: int) -> tuple[int, int]:
    """Where the picture of column ``col``, row ``row`` lies in an annotated grid."""
    return pad_left + (size[0] + margin) * col, pad_top + (size[1] + margin) * row


# --- Running the cells --------------------------------------------------------------------------

def run(generate: Callable[[Cell, Callable], "Result"], params: "GenerationParams", *, info,
        progress: Callable[["Progress"], None] | None = None, cancel=None, models: ModelNames | None = None
        ) -> "Result":
    """The X/Y/Z plot request ``params``: ``generate(cell, report)`` runs one cell's request
    (``cell.params``) on the cell's checkpoint and VAE choice (None: the request's), which
    ``models`` looked up (see :func:`plan`). ``info``: the model recorded when no cell ran."""
    from PIL import Image

    from .records import Progress, Result

    options = params.xyz_plot
    work = plan(params, models)
    per_cell = params.n_iter
    jobs = len(work.cells) * per_cell
    results: list[Result | None] = [None] * len(work.cells)  # in the grid's order
    for done_cells, index in enumerate(work.order):
        if cancel is not None and cancel.interrupted:
            break
        results[index] = generate(work.cells[index], Progress.relay(progress, done_cells * per_cell, jobs))
    done = [r for r in results if r is not None and r.images]
    interrupted = bool(cancel is not None and cancel.interrupted)
    if not done:
        return Result((), (), (), (), params, info, interrupted=interrupted)
    size = done[0].images[0].size
    pictures = [r.images[0] if r is not None and r.images else Image.new("RGB", size) for r in results]
    unfinished_cells = {i for i, r in enumerate(results) if r is None or not r.images or 0 in r.unfinished}
    first = [r if r is not None and r.images else done[0] for r in results]

    nx, ny = len(work.xs), len(work.ys)
    per_grid = nx * ny
    x_labels = [label(options.x_type, v) for v in work.xs]
    y_labels = [label(options.y_type, v) for v in work.ys]
    out: list[tuple[Image.Image, Result, bool]] = []  # picture, the result it takes its texts from, unfinished
    grids = []
    for iz in range(len(work.zs)):
        lo = iz * per_grid
        grid = draw_grid(pictures[lo:lo + per_grid], nx, x_labels, y_labels, margin=options.margin_size,
                         legend=options.draw_legend)
        grids.append((grid, first[lo], any(i in unfinished_cells for i in range(lo, lo + per_grid))))
    if len(grids) > 1:
        z_labels = [label(options.z_type, v) for v in work.zs]
        combined = draw_grid([g for g, _, _ in grids], len(grids), z_labels, [""], legend=options.draw_legend)
        out.append((combined, first[0], bool(unfinished_cells)))
        if options.include_sub_grids:
            out += grids
    else:
        out += grids
    if options.include_lone_images:
        out += [(picture, first[i], i in unfinished_cells) for i, picture in enumerate(pictures)]
    return Result(
        images=tuple(o[0] for o in out), infotexts=tuple(r.infotexts[0] for _, r, _ in out),
        seeds=tuple(r.seeds[0] for _, r, _ in out), subseeds=tuple(r.subseeds[0] for _, r, _ in out), params=params,
        model=first[0].model, interrupted=interrupted,
        prompts=tuple(r.prompts[0] if r.prompts else r.params.prompt for _, r, _ in out),
        negative_prompts=tuple(r.negative_prompts[0] if r.negative_prompts else r.params.negative_prompt
                               for _, r, _ in out),
        unfinished=tuple(i for i, o in enumerate(out) if o[2]))
