"""``underpaint serve``: flags → :class:`ServerConfig` → uvicorn.

The flags follow A1111's where it has one (``--listen``, ``--port``, ``--api-auth``,
``--cors-allow-origins``), with safe defaults: loopback only, no CORS, bounded requests.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import Limits, ServerConfig, parse_api_auth

AUTH_ENV = "UNDERPAINT_API_AUTH"


def add_serve_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="run the AUTOMATIC1111-compatible HTTP API",
        description="Serve the AUTOMATIC1111 /sdapi/v1 API (and /docs) with a FIFO job queue. "
                    "Only this machine can connect unless --listen is given, which needs --api-auth.",
    )
    net = p.add_argument_group("network")
    net.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    net.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from the network (needs --api-auth)")
    net.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                     help=f"require HTTP Basic on every route (or set ${AUTH_ENV}, which keeps it out of `ps`)")
    net.add_argument("--insecure", action="store_true", help="allow --listen without --api-auth")
    net.add_argument("--cors-allow-origins", default="", metavar="ORIGINS",
                     help="comma-separated web origins allowed to call the API from a browser (default: none)")
    net.add_argument("--allowed-hosts", default="", metavar="HOSTS",
                     help="comma-separated Host names to answer to besides localhost (behind a reverse proxy; '*': any)")
    net.add_argument("--nowebui", action="store_true", help="serve the API only, not the browser UI at /")
    net.add_argument("--allow-image-urls", action="store_true",
                     help="let requests name images by http(s) URL (public addresses only); off by default")

    model = p.add_argument_group("model")
    model.add_argument("--models-dir", default=None, help="the models folder (default $UNDERPAINT_MODELS_DIR)")
    model.add_argument("--model", default=None, help="checkpoint to load at start (default: the first in the folder)")
    model.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    model.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: what the device does best)")
    from ..cli.generate import add_memory_and_speed_arguments

    add_memory_and_speed_arguments(model)

    files = p.add_argument_group("files")
    files.add_argument("--outdir", default=None, metavar="FOLDER",
                       help="where requests with save_images write their pictures (txt2img-images/, "
                            "img2img-images/, a folder per day; default: outputs/ beside the models folder); "
                            "a request can only choose whether to save, never where")
    files.add_argument("--styles-file", default=None, metavar="CSV",
                       help="A1111's styles.csv for `styles` in requests (default: styles.csv beside the models "
                            "folder, when it exists)")

    lim = p.add_argument_group("limits")
    defaults = Limits()
    lim.add_argument("--queue-size", type=int, default=16, help="jobs that may wait; more get 503 (default 16)")
    lim.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20,
                     help=f"largest request body in MiB (default {defaults.max_body_bytes // 2**20})")
    lim.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                     help=f"largest input image in pixels (default {defaults.max_image_pixels})")
    lim.add_argument("--max-steps", type=int, default=defaults.max_steps, help=f"(default {defaults.max_steps})")
    lim.add_argument("--max-size", type=int, default=defaults.max_width,
                     help=f"largest width or height in pixels (default {defaults.max_width})")
    lim.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                     help=f"(default {defaults.max_batch_size})")
    p.set_defaults(func=serve_main)
    return p


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    auth_text = args.api_auth or os.environ.get(AUTH_ENV)
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
        max_steps=args.max_steps, max_width=args.max_size, max_height=args.max_size,
        max_batch_size=args.max_batch_size,
    )
    return ServerConfig(
        models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
        model=args.model, device=args.device, dtype=args.dtype, vram=getattr(args, "vram", "high"),
        optimize=getattr(args, "optimize", "") or "", attention=getattr(args, "attention", "auto"),
        vae_precision=getattr(args, "vae_precision", "auto") or "auto", host=host,
        port=args.port,
        api_auth=parse_api_auth(auth_text) if auth_text else (),
        cors_allow_origins=_split(args.cors_allow_origins), allowed_hosts=_split(args.allowed_hosts),
        limits=limits, queue_size=args.queue_size, allow_image_urls=args.allow_image_urls, insecure=args.insecure,
        webui=not args.nowebui,
        outdir=_path(getattr(args, "outdir", None)), styles_file=_path(getattr(args, "styles_file", None)),
    )


def _path(text: str | None) -> Path | None:
    return Path(text).expanduser() if text else None


def serve_main(args: argparse.Namespace) -> int:
    import logging

    from .app import run

    config = config_from_args(args)
    config.check_exposure()  # before importing uvicorn or touching the models
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    run(config)
    return 0
