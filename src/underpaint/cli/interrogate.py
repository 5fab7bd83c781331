"""``underpaint interrogate IMAGE``: a prompt read from a picture (A1111's "Interrogate CLIP" and
"Interrogate DeepBooru")."""

from __future__ import annotations

import argparse


def add_command(sub) -> None:
    p = sub.add_parser("interrogate", help="print a prompt read from a picture (A1111's Interrogate CLIP / DeepBooru)",
                       description="Print a prompt read from a picture. --model clip (the default): BLIP's caption, "
                                   "then CLIP's best matches from the word lists of the models folder's interrogate/ "
                                   "(models/interrogate.py). --model deepdanbooru: the Danbooru tags DeepDanbooru's "
                                   "tagger finds (models/deepbooru.py; underpaint download deepbooru).")
    p.add_argument("image", metavar="IMAGE", help="the picture")
    p.add_argument("--model", default="clip", choices=("clip", "deepdanbooru"),
                   help="clip (default) or deepdanbooru (A1111's Interrogate DeepBooru)")
    p.add_argument("--models-dir", default=None, help="models folder with BLIP/ (the captioner), CLIP/ and "
                                                      "interrogate/, or torch_deepdanbooru/ (default: "
                                                      "$UNDERPAINT_MODELS_DIR or ~/.local/share/underpaint/models; "
                                                      "an A1111 install works)")
    p.add_argument("--device", default="cpu", help="device to run the models on (default cpu; e.g. cuda)")
    p.add_argument("--ranks", action="store_true", help="each match or tag as (text:score) (A1111's include ranks)")
    clip = p.add_argument_group("clip")
    clip.add_argument("--num-beams", type=int, default=1, help="BLIP's beams (A1111's default 1)")
    clip.add_argument("--min-length", type=int, default=24, help="the caption's least tokens (default 24)")
    clip.add_argument("--max-length", type=int, default=48, help="the caption's most tokens (default 48)")
    tags = p.add_argument_group("deepdanbooru (A1111's deepbooru settings)")
    tags.add_argument("--threshold", type=float, default=0.5,
                      help="the least probability a tag needs (default 0.5)")
    tags.add_argument("--sort", choices=("alpha", "score"), default="alpha",
                      help="tags by name (default) or by probability, highest first")
    tags.add_argument("--underscores", action="store_true", help="keep the tags' underscores (default: spaces)")
    tags.add_argument("--no-escape", action="store_true", help="leave brackets unescaped (default: \\( \\))")
    tags.add_argument("--filter-tags", default="", metavar="TAGS", help="tags to leave out, comma-separated")
    p.set_defaults(func=run_interrogate)


def run_interrogate(args: argparse.Namespace) -> int:
    import math

    from ..errors import InvalidParameter
    from ..imageio.load import load_image
    from .generate import models_folder

    for flag, value, low, high in (("num_beams", args.num_beams, 1, 16), ("min_length", args.min_length, 1, 128),
                                   ("max_length", args.max_length, 1, 256)):
        if not low <= value <= high:
            raise InvalidParameter(flag, value, f"a whole number from {low} to {high}")
    if not (math.isfinite(args.threshold) and 0 <= args.threshold <= 1):
        raise InvalidParameter("threshold", args.threshold, "a number from 0 to 1")
    image = load_image(args.image, field="IMAGE")
    if args.model == "deepdanbooru":
        from ..models import deepbooru as db

        path = db.tagger_file(models_folder(args))
        print(db.deepbooru(image, path, device=args.device, threshold=args.threshold, sort_alpha=args.sort == "alpha",
                           use_spaces=not args.underscores, escape=not args.no_escape, filter_tags=args.filter_tags,
                           ranks=args.ranks))
        return 0
    from ..models import interrogate as it

    files = it.interrogate_files(models_folder(args))
    print(it.interrogate(image, files, device=args.device, ranks=args.ranks, num_beams=args.num_beams,
                         min_length=args.min_length, max_length=args.max_length))
    return 0
