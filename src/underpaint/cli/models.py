"""``underpaint models`` and ``underpaint download``: what is in the models folder, and getting more."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("models", help="list the checkpoints in the models folder with their A1111 short hash")
    p.add_argument("--models-dir", default=None,
                   help="models folder (default $UNDERPAINT_MODELS_DIR or ~/.local/share/underpaint/models)")
    p.add_argument("--no-hash", action="store_true", help="don't hash files that have no cached hash yet")
    p.set_defaults(func=run_models)

    d = sub.add_parser("download", help="fetch a known model from the hub into the models folder")
    d.add_argument("name", help="a known model name (see `underpaint download --list`)", nargs="?")
    d.add_argument("--list", action="store_true", help="list the known model names")
    d.add_argument("--models-dir", default=None,
                   help="models folder (default $UNDERPAINT_MODELS_DIR or ~/.local/share/underpaint/models)")
    d.set_defaults(func=run_download)


def _folder(args: argparse.Namespace):
    from .generate import models_folder

    return models_folder(args)


def run_models(args: argparse.Namespace) -> int:
    from ..models.hashes import cached_model_hash, model_hash

    folder = _folder(args)
    entries = folder.list_checkpoints()
    if not entries:
        print(f"no checkpoints in {folder.root} (put .safetensors files in {folder.checkpoints_dir}, "
              "or run `underpaint download sd15`)")
        return 0
    for entry in entries:
        digest = cached_model_hash(entry.path) if args.no_hash else model_hash(entry.path)
        print(f"{entry.name}\t[{digest or '?'}]\t{entry.path}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from ..errors import InvalidParameter
    from ..models.download import KNOWN_MODELS, download

    if args.list or not args.name:
        for name, known in KNOWN_MODELS.items():
            print(f"{name}\t{known.description}")
        return 0
    if args.name not in KNOWN_MODELS:
        raise InvalidParameter("name", args.name, "one of " + ", ".join(KNOWN_MODELS))
    print(download(args.name, _folder(args).root))
    return 0
