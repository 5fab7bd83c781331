"""``underpaint merge``: A1111's Checkpoint Merger on the command line (models/merge.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_command(sub) -> None:
    p = sub.add_parser("merge", help="merge two or three checkpoints into a new one (A1111's Checkpoint Merger)",
                       description="Combine checkpoints tensor by tensor into a new .safetensors file: weighted sum "
                                   "A·(1−M) + B·M, add difference A + (B − C)·M, or no interpolation (A alone, to "
                                   "convert it to fp16 or bake a VAE into it).")
    p.add_argument("a", metavar="A", help="the primary checkpoint: a path, or a name in the models folder")
    p.add_argument("b", metavar="B", nargs="?", help="the secondary checkpoint (not for no-interpolation)")
    p.add_argument("c", metavar="C", nargs="?", help="the tertiary checkpoint (add-difference: what B was trained from)")
    p.add_argument("-o", "--output", required=True, help="the new .safetensors file (never replaced unless --overwrite)")
    p.add_argument("--method", default="weighted-sum", choices=["weighted-sum", "add-difference", "no-interpolation"],
                   help="how to combine them (default weighted-sum)")
    p.add_argument("-M", "--multiplier", type=float, default=0.3,
                   help="M: B's share in a weighted sum, or how much of B − C to add (default 0.3)")
    p.add_argument("--fp16", action="store_true", help="store the result in float16 (half the size)")
    p.add_argument("--bake-vae", metavar="VAE", default=None,
                   help="replace the result's VAE with this VAE file's (a path, or a name in the models folder's vae/)")
    p.add_argument("--discard", metavar="REGEX", default=None,
                   help="leave out the tensors whose name matches this regular expression (A1111's \"Discard "
                        "weights with matching name\")")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--models-dir", default=None,
                   help="models folder (default $UNDERPAINT_MODELS_DIR or ~/.local/share/underpaint/models)")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from ..errors import InvalidParameter
    from ..models.merge import MergeRecipe, merge
    from .generate import models_folder

    folder = models_folder(args)
    if args.method == "no-interpolation" and args.b is not None:
        raise InvalidParameter("B", args.b, "no B with --method no-interpolation (it keeps A alone)")
    if args.method == "weighted-sum" and args.c is not None:
        raise InvalidParameter("C", args.c, "no C with weighted-sum (C is for --method add-difference)")
    recipe = MergeRecipe(
        a=folder.resolve_checkpoint(args.a), b=folder.resolve_checkpoint(args.b) if args.b else None,
        c=folder.resolve_checkpoint(args.c) if args.c else None, method=args.method, multiplier=args.multiplier,
        fp16=args.fp16, bake_vae=folder.resolve_vae(args.bake_vae) if args.bake_vae else None, discard=args.discard)
    out = merge(recipe, Path(args.output), overwrite=args.overwrite)
    print(out)
    sys.stdout.flush()
    return 0
