"""``underpaint upscale``: A1111's Extras tab (its Upscale step) on the command line.

    underpaint upscale photo.png --upscaler 4x-UltraSharp --scale 2 -o big.png
    underpaint upscale shots/ --upscaler "R-ESRGAN 4x+" --resize 2048x2048 --crop -o big/
    underpaint upscale photo.png --upscaler Lanczos --upscaler-2 "R-ESRGAN 4x+" --upscaler-2-visibility 0.5

The upscalers are the ones hires. fix takes (pipeline/upscale.py): the built-in Lanczos and
Nearest, and the upscaling models in the models folder. A PNG result keeps the input's infotext
and gains A1111's ``postprocessing`` text; results are written atomically and never over an
existing file unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidParameter


def add_command(sub) -> None:
    p = sub.add_parser("upscale", help="upscale pictures with Lanczos or an upscaling model (A1111's Extras)",
                       description="Upscale pictures as A1111's Extras tab does: with a built-in upscaler "
                                   "(Lanczos, Nearest) or an upscaling model from the models folder "
                                   "(ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SCUNet: upscale_models/, or an A1111 "
                                   "install's models/ESRGAN, models/RealESRGAN, models/SwinIR, models/DAT, "
                                   "models/HAT and models/ScuNET).")
    p.add_argument("input", metavar="INPUT", help="a picture, or a folder of pictures")
    p.add_argument("--upscaler", "--upscaler-1", dest="upscaler", required=True, metavar="NAME",
                   help="Lanczos, Nearest, or an upscaling model by name (e.g. 4x-UltraSharp, 'R-ESRGAN 4x+')")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=None, metavar="S",
                      help="upscale by this factor (A1111's 'Scale by'; default 4)")
    size.add_argument("--resize", default=None, metavar="WxH",
                      help="upscale to cover this size instead (A1111's 'Scale to')")
    p.add_argument("--crop", action="store_true", help="with --resize: crop the result to exactly WxH")
    p.add_argument("--upscaler-2", default="None", metavar="NAME", help="a second upscaler blended in")
    p.add_argument("--upscaler-2-visibility", type=float, default=0.0, metavar="V",
                   help="how much of the second upscaler's result shows, 0-1 (default 0)")
    p.add_argument("--gfpgan-visibility", type=float, default=0.0, metavar="V",
                   help="A1111's GFPGAN visibility: after the upscale, restore the faces with GFPGAN and blend them "
                        "in by this much, 0-1 (default 0: off; the models folder's GFPGAN/ holds its files)")
    p.add_argument("--codeformer-visibility", type=float, default=0.0, metavar="V",
                   help="the same with CodeFormer, after GFPGAN (its files in Codeformer/)")
    p.add_argument("--codeformer-weight", type=float, default=0.5, metavar="W",
                   help="CodeFormer's weight: 0 restores most, 1 keeps most of the face (default 0.5)")
    p.add_argument("-o", "--output", default=None,
                   help="output file, or folder (default outputs/extras-images/, as A1111); an existing file "
                        "is kept unless --overwrite")
    p.add_argument("--models-dir", default=None, help="models folder (default: $UNDERPAINT_MODELS_DIR or "
                                                      "~/.local/share/underpaint/models)")
    p.add_argument("--device", default="cpu", help="device for upscaling models (default cpu; e.g. cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_upscale)


def _job(args: argparse.Namespace, folder):
    from ..pipeline import upscale
    from .generate import _size_flag

    first = upscale.resolve_upscaler(folder, args.upscaler, "upscaler")
    second = upscale.resolve(folder, args.upscaler_2, "upscaler_2")
    visibility = args.upscaler_2_visibility
    if not 0.0 <= visibility <= 1.0:
        raise InvalidParameter("upscaler_2_visibility", visibility, "a number from 0 to 1")
    from ..pipeline.face_restore import face_model_files

    for field, restorer in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer"),
                            ("codeformer_weight", None)):
        value = getattr(args, field)
        if not 0.0 <= value <= 1.0:
            raise InvalidParameter(field, value, "a number from 0 to 1")
        if restorer is not None and value > 0:
            face_model_files(folder, field, restorer)
    if args.crop and args.resize is None:
        raise InvalidParameter("crop", True, "--resize WxH beside it (--crop cuts the result to that size)")
    scale, width, height, mode = 4.0 if args.scale is None else args.scale, 0, 0, 0
    if args.resize is not None:
        width, height = _size_flag("--resize", args.resize)
        if width < 1 or height < 1:
            raise InvalidParameter("resize", args.resize, "a size of at least 1x1")
        mode = 1
    elif not 0 < scale <= 8:
        raise InvalidParameter("scale", scale, "a factor above 0 and at most 8")
    return upscale.ExtrasJob(upscaler=first, second=None if second == "None" else second, visibility=visibility,
                             mode=mode, scale=scale, width=width, height=height, crop=args.crop,
                             gfpgan_visibility=args.gfpgan_visibility,
                             codeformer_visibility=args.codeformer_visibility, codeformer_weight=args.codeformer_weight,
                             folder=folder)


def run_upscale(args: argparse.Namespace) -> int:
    from ..imageio.metadata import save_image
    from ..pipeline import upscale
    from .generate import _inputs, models_folder, read_inputs
    from .outputs import plan_outputs

    job = _job(args, models_folder(args))
    sources = _inputs(args.input)
    batch_mode = len(sources) > 1 or Path(args.input).is_dir()
    to_folder = args.output is None or args.output.endswith(("/", "\\")) or Path(args.output).is_dir()
    skipped: list[Path] = []
    for source, image in read_inputs(sources, batch_mode, skipped=skipped):  # into a folder, each by its input
        out = plan_outputs(args.output, "extras-images", 1, overwrite=args.overwrite,
                           source=source if batch_mode or to_folder else None)[0]
        result, text = upscale.postprocess(job, image, args.device)
        parameters = image.info.get("parameters")
        saved = save_image(result, out, infotext=parameters if isinstance(parameters, str) else None,
                           overwrite=args.overwrite, extra={"postprocessing": text} if text else None)
        print(saved, file=sys.stdout)
    return 1 if skipped else 0
