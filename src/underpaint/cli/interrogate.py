"""``underpaint interrogate IMAGE``: a prompt read from a picture (A1111's "Interrogate CLIP")."""

from __future__ import annotations

import argparse


def add_command(sub) -> None:
    p = sub.add_parser("interrogate", help="print a prompt read from a picture (A1111's Interrogate CLIP)",
                       description="Print a prompt read from a picture: BLIP's caption, then CLIP's best matches "
                                   "from the word lists of the models folder's interrogate/ (models/interrogate.py).")
    p.add_argument("image", metavar="IMAGE", help="the picture")
    p.add_argument("--models-dir", default=None, help="models folder with BLIP/ (the captioner), CLIP/ and "
                                                      "interrogate/ (default: $UNDERPAINT_MODELS_DIR or "
                                                      "~/.local/share/underpaint/models; an A1111 install works)")
    p.add_argument("--device", default="cpu", help="device to run the models on (default cpu; e.g. cuda)")
    p.add_argument("--ranks", action="store_true", help="each match as (text:score) (A1111's include ranks)")
    p.add_argument("--num-beams", type=int, default=1, help="BLIP's beams (A1111's default 1)")
    p.add_argument("--min-length", type=int, default=24, help="the caption's least tokens (default 24)")
    p.add_argument("--max-length", type=int, default=48, help="the caption's most tokens (default 48)")
    p.set_defaults(func=run_interrogate)


def run_interrogate(args: argparse.Namespace) -> int:
    from ..errors import InvalidParameter
    from ..imageio.load import load_image
    from ..models import interrogate as it
    from .generate import models_folder

    for flag, value, low, high in (("num_beams", args.num_beams, 1, 16), ("min_length", args.min_length, 1, 128),
                                   ("max_length", args.max_length, 1, 256)):
        if not low <= value <= high:
            raise InvalidParameter(flag, value, f"a whole number from {low} to {high}")
    image = load_image(args.image, field="IMAGE")
    files = it.interrogate_files(models_folder(args))
    print(it.interrogate(image, files, device=args.device, ranks=args.ranks, num_beams=args.num_beams,
                         min_length=args.min_length, max_length=args.max_length))
    return 0
