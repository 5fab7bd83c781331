"""``underpaint``: the command line. Parses arguments, calls the library, reports errors in one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UnderpaintError


def build_parser() -> argparse.ArgumentParser:
    from . import control, generate, info, inpaint, models

    parser = argparse.ArgumentParser(
        prog="underpaint",
        description="Stable Diffusion image-to-image with the controls AUTOMATIC1111 users know.",
    )
    parser.add_argument("--version", action="version", version=f"underpaint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    generate.add_commands(sub)
    inpaint.add_commands(sub)
    info.add_command(sub)
    models.add_commands(sub)
    control.add_commands(sub)
    _add_serve(sub)
    return parser


def _add_serve(sub) -> None:
    try:
        from ..server.cli import add_serve_command
    except ImportError:  # the server extra is not installed
        p = sub.add_parser("serve", help="run the HTTP API (needs: pip install 'underpaint[server]')")
        p.set_defaults(func=_no_server)
        return
    add_serve_command(sub)


def _no_server(args: argparse.Namespace) -> int:
    raise UnderpaintError("the HTTP server needs FastAPI and uvicorn: pip install 'underpaint[server]'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnderpaintError as exc:
        print(f"underpaint: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("underpaint: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `underpaint models | head`: quietly stop writing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
