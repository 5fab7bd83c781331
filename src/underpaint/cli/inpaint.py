"""``underpaint inpaint`` and ``underpaint outpaint``: repaint a masked part, or new margins, of a picture."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator

from ..params import GenerationParams, InpaintOptions
from .generate import (_add_generation_args, _load_engine, _run_and_save, a1111_choice, params_from_args,
                       warn_about_request)
from .outputs import plan_outputs

#: CLI spellings of A1111's "Masked content" values.
MASKED_CONTENT = {"fill": "fill", "original": "original", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}
#: CLI spellings of A1111's "Inpaint area": whole picture, or only the masked region at full resolution.
INPAINT_AREAS = {"whole": False, "only-masked": True}
#: A1111's "Inpaint area" label for the whole picture.
_AREA_LABELS = {"whole-picture": "whole"}


def add_commands(sub) -> None:
    inp = sub.add_parser("inpaint", help="repaint the masked part of a picture, keep the rest exactly",
                         description="Repaint where the mask is white; every other pixel stays as it was "
                                     "(exactly, with --mask-blur 0).")
    inp.add_argument("input", metavar="IMAGE", help="the picture to change")
    source = inp.add_mutually_exclusive_group(required=True)
    source.add_argument("--mask", metavar="MASK", help="mask picture: white = repaint, black = keep "
                                                       "(an RGBA mask with transparency uses its alpha)")
    source.add_argument("--mask-from-alpha", action="store_true",
                        help="repaint the picture's transparent pixels (erase in an editor, save as PNG)")
    _add_inpaint_args(inp, outpaint=False)
    _add_generation_args(inp, img2img=True)
    inp.set_defaults(func=run_inpaint)

    out = sub.add_parser("outpaint", help="extend the canvas and paint the new margins",
                         description="Extend the picture on any side (in steps of 8 pixels) and paint the new "
                                     "area to match; the original pixels stay as they were.")
    out.add_argument("input", metavar="IMAGE", help="the picture to extend")
    sides = out.add_argument_group("canvas")
    for side in ("left", "right", "up", "down"):
        sides.add_argument(f"--{side}", type=int, default=0, metavar="N",
                           help=f"pixels to add on the {side} side (rounded up to a multiple of 8)")
    sides.add_argument("--fill", choices=("blur", "edge", "noise", "matched"), default="blur",
                       help="how the new area starts: blurred surrounding colours (default), stretched edge "
                            "pixels, colour noise, or noise matched to the picture (A1111's Outpainting mk2)")
    sides.add_argument("--falloff", type=float, default=1.0, metavar="Q",
                       help="--fill matched: the noise's detail falls off as 1/f^Q (0 to 4; lower is finer; "
                            "A1111's fall-off exponent, default 1)")
    sides.add_argument("--color-variation", type=float, default=0.05, metavar="V",
                       help="--fill matched: how much the noise's colours vary, 0 to 1 (default 0.05)")
    _add_inpaint_args(out, outpaint=True)
    _add_generation_args(out, img2img=True)
    out.set_defaults(func=run_outpaint)


def _add_inpaint_args(p: argparse.ArgumentParser, *, outpaint: bool) -> None:
    g = p.add_argument_group("inpainting (A1111's names)")
    # Defaults None: an infotext's values (--from-infotext) hold unless a flag is given; InpaintOptions' otherwise.
    g.add_argument("--mask-blur", type=int, default=None, metavar="N",
                   help="Gaussian blur of the mask edge in pixels; 0 keeps unmasked pixels exact (default 4)")
    g.add_argument("--mask-blur-x", type=int, default=None, metavar="N", help="horizontal mask blur (default --mask-blur)")
    g.add_argument("--mask-blur-y", type=int, default=None, metavar="N", help="vertical mask blur (default --mask-blur)")
    g.add_argument("--masked-content", choices=sorted(MASKED_CONTENT), default=None,
                   type=a1111_choice(MASKED_CONTENT),
                   help="what the masked area starts from: the original pixels (default), fill (surrounding "
                        "colours), latent-noise or latent-nothing (A1111's spellings, \"latent noise\", work too)")
    g.add_argument("--inpaint-area", choices=sorted(INPAINT_AREAS), default=None,
                   type=a1111_choice(INPAINT_AREAS, _AREA_LABELS),
                   help="work on the whole picture (default) or only the masked region, enlarged to the output "
                        "size (A1111's \"Whole picture\" and \"Only masked\" work too)")
    g.add_argument("--padding", "--only-masked-padding", dest="padding", type=int, default=None, metavar="N",
                   help="A1111's Only masked padding: pixels of context around the mask for --inpaint-area "
                        "only-masked (default 32)")
    if not outpaint:
        g.add_argument("--invert-mask", action="store_true", default=None,
                       help="repaint everything except the masked area")
    g.add_argument("--mask-weight", type=float, default=None, metavar="W",
                   help="conditional mask weight for inpainting checkpoints, 0-1 (default 1)")
    g.add_argument("--soft", action="store_true", default=None,
                   help="soft inpainting: grey mask levels mean partial change")
    g.add_argument("--color-correction", action="store_true", default=None,
                   help="match the repainted colours to the original where nothing was masked (an affine "
                        "correction measured outside the mask; A1111's own is --img2img-color-correction)")


def inpaint_options(args: argparse.Namespace, base: InpaintOptions | None = None) -> InpaintOptions:
    """The inpainting flags given, over ``base`` (what ``--from-infotext`` read, else the defaults)."""
    from dataclasses import replace

    changes = {
        "mask_blur_x": args.mask_blur if args.mask_blur_x is None else args.mask_blur_x,
        "mask_blur_y": args.mask_blur if args.mask_blur_y is None else args.mask_blur_y,
        "masked_content": None if args.masked_content is None else MASKED_CONTENT[args.masked_content],
        "full_res": None if args.inpaint_area is None else INPAINT_AREAS[args.inpaint_area],
        "full_res_padding": args.padding,
        "invert": getattr(args, "invert_mask", None),
        "mask_weight": args.mask_weight,
        "soft": args.soft,
        "color_correction": args.color_correction,
    }
    return replace(base or InpaintOptions(), **{k: v for k, v in changes.items() if v is not None})


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Library warnings (a resized mask, ...) as one ``underpaint: warning:`` line each; deprecation
    notices that libraries give their programmers (torch, diffusers) are not for the person painting."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"underpaint: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = show
        yield


def run_inpaint(args: argparse.Namespace) -> int:
    from ..imageio.load import load_image
    from ..imageio.mask import mask_from_alpha

    image = load_image(args.input, field="IMAGE")
    mask = mask_from_alpha(image, field="IMAGE") if args.mask_from_alpha else load_image(args.mask, field="--mask")
    def make(model=None) -> GenerationParams:
        params = params_from_args(args, (image,), model=model)
        return params.replace(mask=mask, inpaint=inpaint_options(args, params.inpaint))

    return _run(args, make, "inpaint")


def run_outpaint(args: argparse.Namespace) -> int:
    from ..imageio.load import load_image
    from ..pipeline.inpaint import OutpaintOptions, outpaint_params

    image = load_image(args.input, field="IMAGE")
    sides = OutpaintOptions(left=args.left, right=args.right, up=args.up, down=args.down, fill=args.fill,
                            falloff=args.falloff, color_variation=args.color_variation)
    def make(model=None) -> GenerationParams:
        params = params_from_args(args, (image,), model=model)
        return outpaint_params(params.replace(inpaint=inpaint_options(args, params.inpaint)), sides)

    return _run(args, make, "outpaint")


def _run(args: argparse.Namespace, make, command: str) -> int:
    """Check the mask against the picture before the (slow) model load, then generate and save.

    ``make(model)`` builds the request; with the loaded model its family's defaults apply.
    """
    from ..pipeline.inpaint import prepare_mask
    from ..imageio.mask import is_empty

    warn_about_request(args)
    params = make()
    with _warnings_as_lines():
        if is_empty(prepare_mask(params)):
            print("underpaint: warning: the mask is empty (nothing to repaint): the picture comes back unchanged",
                  file=sys.stderr)
        plan_outputs(args.output, command, params.batch_size * params.n_iter, overwrite=args.overwrite, source=None)
        engine = _load_engine(args)
        params = make(engine.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already reported above
            _run_and_save(engine, params, args, command, None)
    return 0
