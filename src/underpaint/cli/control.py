"""ControlNet on the command line: ``--control TYPE:IMAGE[:WEIGHT]`` units for img2img/txt2img, and
``underpaint detect TYPE IMAGE -o map.png`` to see what a preprocessor makes of a picture.

Flags such as ``--control-model`` and ``--control-start`` apply to the ``--control`` before them,
so several units are written one after another::

    --control depth:room.jpg --control-end 0.6 --control canny:room.jpg:0.6 --control-mode prompt

With a union ControlNet, ``--control-type`` says which control type the unit's map is (A1111's
``union_control_type``); a ready-made map needs it::

    --control none:edges.png --control-model promax --control-type "Hard Edge"

With hires. fix, ``--control-hr-option`` keeps a unit to one pass (A1111's "Hires-fix option")::

    --control canny:room.jpg --control-hr-option "low res only"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidParameter
from ..models.union_types import CONTROL_TYPES, SDXL_TYPES, union_type_name

_DEST = "control_drafts"


def _hr_option(value: str) -> str:
    """The flag's hires-fix option, checked as the unit will check it (imported here: the pipeline
    module brings torch, which ``--help`` does not need)."""
    from ..pipeline.control import hr_option_name

    return hr_option_name(value)


# flag → (unit field, converter, help)
_MODIFIERS = {
    "--control-model": ("model", str, "ControlNet for the unit before it: a name in models/controlnet/ or a path"),
    "--control-weight": ("weight", float, "weight of the unit before it (0-2, default 1)"),
    "--control-start": ("guidance_start", float, "fraction of the steps where the unit starts (default 0)"),
    "--control-end": ("guidance_end", float, "fraction of the steps where the unit stops (default 1)"),
    "--control-mode": ("control_mode", str, "balanced, prompt (my prompt is more important) or controlnet "
                                            "(ControlNet is more important)"),
    "--control-resize": ("resize_mode", str, "how the map fits the output: crop-and-resize (default), "
                                             "just-resize or resize-and-fill"),
    "--control-res": ("processor_res", int, "preprocessor resolution (default 512)"),
    "--control-threshold-a": ("threshold_a", float, "the preprocessor's first threshold (e.g. canny low)"),
    "--control-threshold-b": ("threshold_b", float, "the preprocessor's second threshold (e.g. canny high)"),
    "--control-hr-option": ("hr_option", _hr_option,
                            "with hires. fix, the passes the unit before it runs in: both (default), "
                            "'low res only' (the first pass) or 'high res only' (the second); any case"),
    "--control-type": ("union_control_type", union_type_name,
                       "for a union ControlNet, the control type of the unit's map: " + ", ".join(SDXL_TYPES)
                       + "; FLUX union models also " + ", ".join(CONTROL_TYPES[len(SDXL_TYPES):])
                       + " (any case; canny, scribble, ... also work). Default: the preprocessor's type; "
                       "a ready-made map (none) needs this"),
}


class _NewUnit(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        drafts = list(getattr(namespace, _DEST, None) or [])
        drafts.append(parse_control_spec(values))
        setattr(namespace, _DEST, drafts)


class _Modify(argparse.Action):
    def __init__(self, option_strings, dest, field: str, convert, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.field, self.convert = field, convert

    def __call__(self, parser, namespace, values, option_string=None):
        drafts = list(getattr(namespace, _DEST, None) or [])
        if not drafts:
            parser.error(f"{option_string} must come after the --control it applies to")
        value = True if values in (None, []) else values
        try:
            value = self.convert(value)
        except ValueError:
            parser.error(f"{option_string}: invalid value {values!r}")
        except InvalidParameter as exc:
            parser.error(f"{option_string}: got {values!r}, expected {exc.expected}")
        drafts[-1] = {**drafts[-1], self.field: value}
        setattr(namespace, _DEST, drafts)


class _AddImage(argparse.Action):
    """Another reference picture for the unit before it (A1111's Multi-Inputs), kept in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        drafts = list(getattr(namespace, _DEST, None) or [])
        if not drafts:
            parser.error(f"{option_string} must come after the --control it applies to")
        if "image" not in drafts[-1]:
            parser.error(f"{option_string} needs the unit's first picture in --control TYPE:IMAGE")
        drafts[-1] = {**drafts[-1], "extra_images": [*drafts[-1].get("extra_images", ()), values]}
        setattr(namespace, _DEST, drafts)


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """The ControlNet flags of img2img and txt2img."""
    g = parser.add_argument_group("ControlNet", "each --control adds a unit; the flags after it set that unit")
    g.add_argument("--control", action=_NewUnit, metavar="TYPE[:IMAGE[:WEIGHT]]", dest=_DEST, default=[],
                   help="preprocessor (canny, depth, openpose, lineart, softedge, scribble, tile, none, ...) "
                        "and control image (default: the img2img input)")
    for flag, (field, convert, text) in _MODIFIERS.items():
        g.add_argument(flag, action=_Modify, field=field, convert=convert, dest=_DEST, help=text,
                       metavar=flag.removeprefix("--control-").replace("-", "_").upper())
    g.add_argument("--control-add-image", action=_AddImage, dest=_DEST, metavar="IMAGE",
                   help="another reference picture for the IP-Adapter unit before it (repeat for more): the "
                        "adapter reads each and averages them, as A1111's Multi-Inputs")
    g.add_argument("--pixel-perfect", action=_Modify, field="pixel_perfect", convert=bool, nargs=0, dest=_DEST,
                   help="choose the preprocessor resolution from the output size (the unit before it)")
    g.add_argument("--annotators-dir", default=None,
                   help="where preprocessor weights are (default: <models folder>/annotators)")


def parse_control_spec(text: str) -> dict:
    """``TYPE``, ``TYPE:IMAGE`` or ``TYPE:IMAGE:WEIGHT``; an image path may itself contain ':'."""
    module, sep, rest = text.partition(":")
    if not module:
        raise argparse.ArgumentTypeError(f"--control {text!r}: expected TYPE[:IMAGE[:WEIGHT]]")
    draft: dict = {"module": module}
    if not sep or not rest:
        return draft
    head, colon, tail = rest.rpartition(":")
    if colon and head and not Path(rest).exists():
        try:
            draft["weight"] = float(tail)
            rest = head
        except ValueError:
            pass
    draft["image"] = rest
    return draft


def control_units_from_args(args: argparse.Namespace, *, load=None) -> tuple:
    """The units the flags describe, with their images loaded (checked before any model is loaded)."""
    from ..pipeline.control import ControlUnit

    if load is None:
        from ..imageio.load import load_image as load
    units = []
    for i, draft in enumerate(getattr(args, _DEST, None) or []):
        fields = dict(draft)
        if "image" in fields:
            fields["image"] = load(fields["image"], field=f"--control #{i + 1} image")
        fields["extra_images"] = tuple(load(path, field=f"--control #{i + 1} --control-add-image {path}")
                                       for path in fields.get("extra_images", ()))
        try:
            units.append(ControlUnit(**fields))
        except InvalidParameter as exc:
            if exc.field != "extra_images":
                raise
            raise InvalidParameter(f"--control #{i + 1} --control-add-image", exc.value, exc.expected) from None
    return tuple(units)


def annotators_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "annotators_dir", None):
        return Path(args.annotators_dir).expanduser()
    from ..models.registry import default_models_dir

    root = Path(args.models_dir).expanduser() if getattr(args, "models_dir", None) else default_models_dir()
    return root / "annotators"


# --- underpaint detect --------------------------------------------------------------------------------------


def add_commands(sub) -> None:
    p = sub.add_parser("detect", help="run a ControlNet preprocessor alone and save its map",
                       description="Run a ControlNet preprocessor (canny, depth, openpose, ...) on a picture.")
    p.add_argument("type", metavar="TYPE", help="preprocessor name, e.g. canny, depth, openpose, lineart")
    p.add_argument("image", metavar="IMAGE", help="the picture to analyse")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the map (.png, or .jpg/.webp; an existing file is kept unless --overwrite)")
    p.add_argument("--res", type=int, default=512, help="preprocessor resolution (default 512)")
    p.add_argument("--threshold-a", type=float, default=None, help="first threshold (module default)")
    p.add_argument("--threshold-b", type=float, default=None, help="second threshold (module default)")
    p.add_argument("-W", "--width", type=int, default=None, help="fit the map to this width (with --height)")
    p.add_argument("-H", "--height", type=int, default=None, help="fit the map to this height")
    p.add_argument("--resize-mode", default="crop-and-resize", help="crop-and-resize, just-resize or resize-and-fill")
    p.add_argument("--seed", type=int, default=0, help="seed of random preprocessors (shuffle)")
    p.add_argument("--models-dir", default=None, help="models folder (its annotators/ holds preprocessor weights)")
    p.add_argument("--annotators-dir", default=None, help="preprocessor weights folder")
    p.add_argument("--device", default="cpu", help="device for preprocessor networks (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..imageio.load import load_image
    from ..imageio.metadata import save_image
    from ..preprocess.common import AnnotatorContext, fit_map
    from ..preprocess.registry import run_preprocessor
    from .outputs import plan_outputs

    # The extension, the folder and an existing file are checked before the work, as for img2img.
    out = plan_outputs(args.output, "detect", 1, overwrite=args.overwrite, source=None)[0]
    if (args.width is None) != (args.height is None):
        raise InvalidParameter("--width/--height", args.width or args.height, "both or neither")
    image = load_image(args.image, field="IMAGE")
    ctx = AnnotatorContext(annotators_dir=annotators_dir(args), device=args.device)
    pixels = np.asarray(image.convert("RGBA" if image.mode in ("RGBA", "LA") else "RGB"))
    if pixels.shape[2] == 4 and not args.type.lower().startswith("inpaint"):
        pixels = pixels[:, :, :3]
    detected = run_preprocessor(args.type, pixels, res=args.res, a=args.threshold_a, b=args.threshold_b,
                                seed=args.seed, ctx=ctx)
    if args.width is not None:
        detected = fit_map(detected, args.width, args.height, args.resize_mode)
    # Written atomically and never over an existing file unless asked (imageio/metadata.py).
    print(save_image(Image.fromarray(detected, "RGBA" if detected.shape[2] == 4 else "RGB"), out,
                     overwrite=args.overwrite), file=sys.stdout)
    return 0
