"""``underpaint info IMAGE``: the generation parameters stored in an image."""

from __future__ import annotations

import argparse
import json

from ..errors import ImageError


def add_command(sub) -> None:
    p = sub.add_parser("info", help="print the generation parameters stored in an image (A1111 or ComfyUI)",
                       description="Print the generation parameters stored in an image.")
    p.add_argument("image", metavar="IMAGE", help="a PNG, JPEG or WebP picture (A1111's PNG Info)")
    p.add_argument("--json", action="store_true", help="print the parsed parameters as JSON")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from ..imageio.infotext import parse_infotext
    from ..imageio.metadata import read_metadata

    meta = read_metadata(args.image)
    if meta.infotext is None and meta.comfy_prompt is None and meta.comfy_workflow is None:
        raise ImageError(f"{args.image}: no generation parameters found (no A1111 'parameters' text or ComfyUI data)")
    if args.json:
        out = {}
        if meta.infotext is not None:
            parsed = parse_infotext(meta.infotext)
            out["prompt"], out["negative_prompt"], out["parameters"] = parsed.prompt, parsed.negative_prompt, parsed.params
        if meta.comfy_prompt is not None:
            out["comfyui_prompt"] = _json_or_text(meta.comfy_prompt)
        if meta.comfy_workflow is not None:
            out["comfyui_workflow"] = _json_or_text(meta.comfy_workflow)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if meta.infotext is not None:
        print(meta.infotext)
    if meta.comfy_prompt is not None:
        print("ComfyUI prompt:", meta.comfy_prompt)
    if meta.comfy_workflow is not None:
        print("ComfyUI workflow:", meta.comfy_workflow)
    return 0


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text
