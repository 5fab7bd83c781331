"""``underpaint``: the command line. Parses arguments, calls the library, reports errors in one line."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UnderpaintError


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its usage errors in one line, as every other error is: the full usage
    of ``img2img`` is a screenful in which the one line that matters is easily missed (``--help``
    still shows it)."""

    def error(self, message: str):
        self.exit(2, f"underpaint: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but flags it does not know are reported by the command they were given to,
        with the nearest flag it has (``--cfg_scale``: did you mean ``--cfg-scale``?)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = getattr(parsed, "command_parser", None) or self
            message = "unrecognized arguments: " + " ".join(extras)
            flag = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), None)
            if flag is not None:
                message += self._hint(parser, flag.replace("_", "-").lower())
            parser.error(message)
        return parsed

    def _hint(self, parser: argparse.ArgumentParser, flag: str) -> str:
        """A near miss of one of the command's flags, or the other commands that have this flag."""
        known = [s for action in parser._actions for s in action.option_strings]  # noqa: SLF001
        if flag in known:
            return f"; did you mean {flag}?"
        # Of the similar flags, the one that starts most like it (--denoise: --denoising-strength, not
        # --device or --s-noise); none that shares only the dashes.
        close = difflib.get_close_matches(flag, known, n=5, cutoff=0.6)
        best = max(close, key=lambda s: len(os.path.commonprefix([s, flag])), default=None)
        if best is not None and len(os.path.commonprefix([best, flag])) > 2:
            return f"; did you mean {best}?"
        commands = next((a.choices for a in self._actions  # noqa: SLF001
                         if isinstance(a, argparse._SubParsersAction)), {})  # noqa: SLF001
        having = [name for name, command in commands.items()
                  if any(flag in action.option_strings for action in command._actions)]  # noqa: SLF001
        return f" ({flag} is a flag of `underpaint {' / '.join(having)}`)" if having else ""


def build_parser() -> argparse.ArgumentParser:
    from . import control, generate, info, inpaint, interrogate, merge, models, upscale

    parser = _Parser(
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
    upscale.add_command(sub)
    interrogate.add_command(sub)
    merge.add_command(sub)
    _add_serve(sub)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # errors name the flags of the command that ran
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


#: Request fields (as the library's errors name them) → where the two differ, what sets them on the
#: command line: flags, or the ``dest`` of an argument (a positional's is shown by its name, INPUT),
#: the first one the command has. ``resize_mode`` is ControlNet's before img2img's, whose own
#: ``--resize-mode`` cannot give a bad value (argparse checks its choices).
_FIELD_FLAGS: dict[str, tuple[str, ...]] = {
    "n_iter": ("--count",), "eta_noise_seed_delta": ("--ensd",), "token_merging_ratio": ("--token-merging",),
    "seed_resize_from_w": ("--seed-resize-from",), "seed_resize_from_h": ("--seed-resize-from",),
    "hires_resize_x": ("--hires-resize",), "hires_resize_y": ("--hires-resize",),
    "hires_token_merging_ratio": ("--hires-token-merging",),
    "s_min_uncond": ("--ngms",), "s_min_uncond_all": ("--ngms-all-steps",), "skip_early_cond": ("--skip-early-cfg",),
    "vae_encode_method": ("--vae-encoder",), "vae_decode_method": ("--vae-decoder",),
    "noise_multiplier": ("--noise-multiplier",), "extra_noise": ("--extra-noise",),
    "aesthetic_score": ("--aesthetic-score",), "unipc_order": ("--unipc-order",),
    "sdxl_crop_top": ("--sdxl-crop",), "sdxl_crop_left": ("--sdxl-crop",),
    "beta_alpha": ("--beta-alpha",), "beta_beta": ("--beta-beta",), "negative_aesthetic_score": ("--negative-aesthetic-score",),
    "hires_checkpoint": ("--hires-checkpoint",),
    "freeu": ("--freeu",), "freeu_b1": ("--freeu",), "freeu_b2": ("--freeu",), "freeu_s1": ("--freeu",),
    "freeu_s2": ("--freeu",),
    "mask_blur_x": ("--mask-blur",), "mask_blur_y": ("--mask-blur",), "full_res_padding": ("--padding",),
    "deepcache_interval": ("--deepcache",), "init_images": ("input",),
    # ControlNet units (pipeline/control.py) and `underpaint detect`.
    "module": ("type", "--control"), "control weight": ("--control-weight",), "guidance_start": ("--control-start",),
    "guidance_end": ("--control-end",), "control_mode": ("--control-mode",), "processor_res": ("--control-res",),
    "resize_mode": ("--control-resize", "--resize-mode"),
    # `underpaint upscale` (A1111's Extras).
    "upscaler": ("--upscaler",), "upscaler_1": ("--upscaler",), "upscaler_2": ("--upscaler-2",),
    "upscaler_2_visibility": ("--upscaler-2-visibility",), "scale": ("--scale",), "resize": ("--resize",),
    "gfpgan_visibility": ("--gfpgan-visibility",), "codeformer_visibility": ("--codeformer-visibility",),
    "codeformer_weight": ("--codeformer-weight",), "code_former_weight": ("--codeformer-weight",),
    "face_restoration_model": ("--face-restorer",),
    "crop": ("--crop",),
    "loopback": ("--loopback",), "loopback_loops": ("--loopback",),
    "loopback_final_strength": ("--loopback-final-strength",), "loopback_curve": ("--loopback-curve",),
    "loopback_interrogate": ("--loopback-interrogate",),
    "sd_upscale": ("--sd-upscale",), "sd_upscale_scale": ("--sd-upscale",),
    "sd_upscale_upscaler": ("--sd-upscale-upscaler",), "sd_upscale_overlap": ("--sd-upscale-overlap",),
    "xyz_plot": ("--xyz-x",), "xyz_x": ("--xyz-x",), "xyz_x_type": ("--xyz-x",), "xyz_y": ("--xyz-y",),
    "xyz_y_type": ("--xyz-y",), "xyz_z": ("--xyz-z",), "xyz_z_type": ("--xyz-z",),
    "xyz_x_values": ("--xyz-x-values",), "xyz_y_values": ("--xyz-y-values",), "xyz_z_values": ("--xyz-z-values",),
    "xyz_cells": ("--xyz-cells",), "xyz_sub_grids": ("--xyz-sub-grids",), "xyz_no_legend": ("--xyz-no-legend",),
    "xyz_keep_seeds": ("--xyz-keep-seeds",), "xyz_vary_seeds": ("--xyz-vary-seeds",),
    "xyz_margin": ("--xyz-margin",), "xyz_margin_size": ("--xyz-margin",),
    "adetailer": ("--adetailer",), "adetailer_prompt": ("--adetailer-prompt",),
    "adetailer_negative_prompt": ("--adetailer-negative-prompt",), "adetailer_strength": ("--adetailer-strength",),
    "adetailer_confidence": ("--adetailer-confidence",), "adetailer_padding": ("--adetailer-padding",),
    "adetailer_steps": ("--adetailer-steps",), "adetailer_top_k": ("--adetailer-top-k",),
    "adetailer_top_k_by": ("--adetailer-top-k-by",), "adetailer_classes": ("--adetailer-classes",),
    "adetailer_restore_face": ("--adetailer-restore-face",), "adetailer_controlnet": ("--adetailer-controlnet",),
    "adetailer_controlnet_module": ("--adetailer-controlnet-module",),
    "adetailer_controlnet_weight": ("--adetailer-controlnet-weight",),
    "adetailer_checkpoint": ("--adetailer-checkpoint",), "detailer[0].checkpoint": ("--adetailer-checkpoint",),
    "adetailer_vae": ("--adetailer-vae",), "detailer[0].vae": ("--adetailer-vae",),
    "num_beams": ("--num-beams",), "min_length": ("--min-length",), "max_length": ("--max-length",),
    "prompt_matrix": ("--prompt-matrix",), "prompt_matrix_negative": ("--prompt-matrix-negative",),
    "prompt_matrix_prompt_type": ("--prompt-matrix-negative",), "prompt_matrix_at_start": ("--prompt-matrix-at-start",),
    "prompt_matrix_different_seeds": ("--prompt-matrix-different-seeds",),
    "prompt_matrix_joiner": ("--prompt-matrix-joiner",), "prompt_matrix_margin": ("--prompt-matrix-margin",),
    "prompt_matrix_margin_size": ("--prompt-matrix-margin",), "prompts_from_file": ("--prompts-from",),
    "prompts_from": ("--prompts-from",), "prompts_text": ("--prompts-from",), "prompts_at": ("--prompts-at",),
    "prompts_position": ("--prompts-at",), "prompts_iterate_seed": ("--prompts-iterate-seed",),
    "prompts_same_seed": ("--prompts-same-seed",), "prompts_combined": ("--prompts-combined",),
}
#: Fields named the same as their flag's ``dest`` (``strength`` is ``--strength``). Only these and
#: the ones above are renamed: other errors name things that are not flags (a ``<lora:...>`` tag in
#: the prompt, a ControlNet unit's model, an infotext key).
_SAME_NAME = frozenset({
    "prompt", "negative_prompt", "strength", "steps", "cfg_scale", "distilled_cfg_scale", "image_cfg_scale", "sampler",
    "scheduler", "seed", "subseed", "subseed_strength", "width", "height", "batch_size",
    "clip_skip", "rng", "eta", "s_churn", "s_noise", "hires_scale", "hires_upscaler", "hires_steps",
    "hires_strength", "hires_sampler", "hires_scheduler", "hires_prompt", "hires_negative_prompt",
    "masked_content", "mask_weight", "deepcache_branch", "deepcache_start", "deepcache_end",
    "first_block_cache", "output", "from_infotext", "styles_file", "vram", "optimize", "attention",
    "vae_precision", "device", "dtype", "prediction", "fill", "img2img_upscaler",
    "a", "b", "c",  # `underpaint merge`'s checkpoints A, B, C
})


def _flag_of(parser: argparse.ArgumentParser | None, field: str | None) -> str | None:
    """How ``parser``'s command spells the request field ``field``: a flag (``--count`` for
    ``n_iter``, the first long one of an argument), a positional's name (``INPUT``), or None where
    it has none."""
    if parser is None or not field:
        return None
    actions = parser._actions  # noqa: SLF001 - argparse keeps its arguments here
    for candidate in _FIELD_FLAGS.get(field, (field,) if field in _SAME_NAME else ()):
        if candidate.startswith("-"):
            if any(candidate in action.option_strings for action in actions):
                return candidate
            continue
        for action in actions:
            if action.dest == candidate:
                if not action.option_strings:
                    return action.metavar or candidate.upper()
                return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    return None


def error_line(exc: UnderpaintError, parser: argparse.ArgumentParser | None = None) -> str:
    """The error's one-line message, with the request field it names spelled as the command's flag:
    ``--count: got 0, ...`` rather than ``n_iter: got 0, ...``; a message that names a file but not
    its flag (``--from-infotext``, ``--output``) gets the flag in front."""
    message = exc.message
    flag = _flag_of(parser, exc.field)
    if flag is None:
        return message
    if message.startswith(f"{exc.field}: "):
        return flag + message[len(exc.field):]
    if exc.field in ("from_infotext", "output") and flag not in message:
        return f"{flag}: {message}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnderpaintError as exc:
        print(f"underpaint: error: {error_line(exc, getattr(args, 'command_parser', None))}", file=sys.stderr)
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
