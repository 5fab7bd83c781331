"""``underpaint img2img`` and ``underpaint txt2img``: flags → GenerationParams → engine → files."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import ImageError, InvalidParameter
from ..models.modes import VAE_PRECISIONS, VRAM_MODES
from ..models.optimize import ATTENTION_BACKENDS
from ..params import HIRES_UPSCALERS, MAX_FREEU, FreeUOptions, GenerationParams, HiresOptions, SamplerOptions
from .cache import add_cache_arguments, with_cache
from .control import control_units_from_args
from .outputs import plan_outputs
from .progress import ProgressBar

RESIZE_MODES = {"just-resize": 0, "crop-and-resize": 1, "resize-and-fill": 2, "latent-upscale": 3,
                "0": 0, "1": 1, "2": 2, "3": 3}
#: A1111's labels that do not become a choice above by :func:`a1111_choice`'s spelling rules.
_RESIZE_LABELS = {"just-resize-latent-upscale": "latent-upscale"}


def a1111_choice(choices, aliases: dict[str, str] | None = None):
    """An argparse ``type`` for a flag with fixed choices that also takes them as A1111's UI labels
    them: in any case, with spaces for dashes and without parentheses ("Crop and resize" is
    ``crop-and-resize``, "Just resize (latent upscale)" is ``latent-upscale``). Anything else is
    passed on unchanged for argparse to refuse, listing the choices."""

    def convert(text: str) -> str:
        key = "-".join(text.lower().replace("(", " ").replace(")", " ").replace("_", " ").replace("-", " ").split())
        key = (aliases or {}).get(key, key)
        return key if key in choices else text

    return convert


def add_commands(sub) -> None:
    img = sub.add_parser("img2img", help="transform a picture (or every picture in a folder) with a prompt",
                         description="Transform a picture with a prompt, keeping its composition.")
    img.add_argument("input", metavar="INPUT", help="an image file, or a folder of images to process in turn")
    _add_generation_args(img, img2img=True)
    _add_sd_upscale_args(img)
    _add_loopback_args(img)
    _add_xyz_args(img)
    _add_prompt_script_args(img)
    img.set_defaults(func=run_img2img)

    txt = sub.add_parser("txt2img", help="make a picture from a prompt alone",
                         description="Make a picture from a prompt (img2img at full strength, from noise).")
    _add_generation_args(txt, img2img=False)
    _add_xyz_args(txt)
    _add_prompt_script_args(txt)
    txt.set_defaults(func=run_txt2img)


def _add_generation_args(p: argparse.ArgumentParser, *, img2img: bool) -> None:
    g = p.add_argument_group("prompt")
    g.add_argument("-p", "--prompt", default="", help="what the picture should show")
    g.add_argument("-n", "--negative-prompt", default="", help="what it should not show")
    g.add_argument("--no-prompt-comments", dest="prompt_comments", action="store_false", default=True,
                   help="keep # and what follows it in the prompts (by default, as in A1111, # hides the rest "
                        "of its line)")
    g.add_argument("--from-infotext", "--params-from", dest="from_infotext", metavar="IMAGE_OR_TXT", default=None,
                   help="take prompt, seed, sampler, size, ... (and the checkpoint, without --model) from the A1111 "
                        "parameters in a PNG, JPEG or WebP file or a text file; flags given here override them")
    g.add_argument("--lora", action="append", metavar="NAME:WEIGHT", default=None,
                   help="apply a LoRA from the models folder's loras/ (repeatable); the same as <lora:NAME:WEIGHT> "
                        "in the prompt, also NAME:TE_WEIGHT:UNET_WEIGHT")
    g.add_argument("--hypernet", action="append", metavar="NAME:STRENGTH", default=None,
                   help="apply a hypernetwork (.pt) from the models folder's hypernetworks/ (repeatable); the same "
                        "as <hypernet:NAME:STRENGTH> in the prompt (strength 1 when left out)")
    g.add_argument("--style", dest="styles", action="append", metavar="NAME", default=None,
                   help="apply a prompt style from styles.csv (repeatable, applied in order): its text is added "
                        "to the prompt after ', ', or the prompt goes where it says {prompt}; likewise its "
                        "negative text")
    g.add_argument("--styles-file", default=None, metavar="CSV",
                   help="A1111's styles.csv to take --style from (default: styles.csv beside the models folder)")

    s = p.add_argument_group("sampling")
    if img2img:
        s.add_argument("-s", "--strength", "--denoising-strength", dest="strength", type=float, default=0.75,
                       help="denoising strength 0-1: 0 keeps the input, 1 ignores it (default 0.75)")
        s.add_argument("--fix-steps", action="store_true",
                       help="run exactly --steps steps whatever the strength (A1111's img2img_fix_steps)")
    s.add_argument("--steps", "--sampling-steps", dest="steps", type=int, default=20,
                   help="sampling steps (default 20; FLUX.1-schnell: 4)")
    s.add_argument("--cfg", "--cfg-scale", dest="cfg_scale", type=float, default=7.0,
                   help="CFG scale: how strictly to follow the prompt (default 7; FLUX: 1, which skips the "
                        "negative prompt)")
    s.add_argument("--guidance", "--distilled-cfg-scale", dest="distilled_cfg_scale", type=float, default=None,
                   help="FLUX.1-dev's built-in guidance, Forge's Distilled CFG Scale (default 3.5)")
    if img2img:
        s.add_argument("--image-cfg", "--image-cfg-scale", dest="image_cfg_scale", type=float, default=None,
                       help="InstructPix2Pix edit models' Image CFG Scale: how closely to keep to the picture "
                            "(default 1.5; 1: no image guidance)")
    s.add_argument("--sampler", "--sampler-name", "--sampling-method", dest="sampler", default="DPM++ 2M",
                   help='sampling method by its A1111 or ComfyUI name, any case: "Euler a", "DPM++ 2M SDE", '
                        '"dpmpp_2m", ...; an A1111 name with a schedule, "DPM++ 2M Karras", also sets the '
                        'schedule type, over --scheduler as in A1111 (default "DPM++ 2M"; FLUX: "Euler")')
    s.add_argument("--scheduler", "--schedule-type", dest="scheduler", default="Automatic",
                   help="schedule type: Automatic, Uniform, Karras, Exponential, Polyexponential, SGM Uniform, "
                        "KL Optimal, Align Your Steps, Simple, Normal, DDIM, Beta (default Automatic: the "
                        "sampler's own, Karras for DPM++ 2M; FLUX: Simple)")
    s.add_argument("--clip-skip", type=int, default=1,
                   help="A1111's Clip skip: stop the text encoder this many layers early, 1-12 (default 1)")
    s.add_argument("--eta", type=float, default=None,
                   help="noise multiplier for ancestral/SDE samplers and DDIM (A1111's Eta; default: the "
                        "sampler's own, 1 for ancestral, 0 for DDIM)")
    s.add_argument("--s-churn", type=float, default=0.0, help="A1111's Sigma churn (Euler, Heun, DPM2; default 0)")
    s.add_argument("--s-noise", type=float, default=1.0, help="A1111's Sigma noise (default 1)")
    s.add_argument("--beta-alpha", dest="beta_alpha", type=float, default=0.6, metavar="A",
                   help="A1111's Beta scheduler alpha: the Beta schedule's shape, 0.01-10 (default 0.6)")
    s.add_argument("--beta-beta", dest="beta_beta", type=float, default=0.6, metavar="B",
                   help="A1111's Beta scheduler beta (default 0.6)")
    s.add_argument("--unipc-order", dest="unipc_order", type=int, default=3, metavar="N",
                   help="A1111's UniPC order: the UniPC sampler's solver order, 1-50 (default 3; at most the steps)")
    if not img2img:
        s.add_argument("--sgm-noise-multiplier", dest="sgm_noise_multiplier", action="store_const", const=True,
                       default=False,
                       help="A1111's SGM noise multiplier: scale the start noise as Stability's SGM code (SDXL's "
                            "reference) does, to reproduce its pictures (k-diffusion samplers)")
    if img2img:
        s.add_argument("--noise-multiplier", dest="noise_multiplier", type=float, default=1.0, metavar="M",
                       help="A1111's Noise multiplier for img2img: the start noise times M, 0-4 (default 1; A1111's "
                            "slider goes to 1.5)")
    s.add_argument("--extra-noise", dest="extra_noise", type=float, default=0.0, metavar="E",
                   help="A1111's Extra noise multiplier for img2img and hires fix: the start noise once more, times E, "
                        "0-1 (default 0: off; keep it below the denoising strength)")
    s.add_argument("--token-merging", "--token-merging-ratio", dest="token_merging", type=float, default=0.0,
                   metavar="RATIO",
                   help="token merging (ToMe, A1111's Token merging ratio): merge this share of the tokens, 0-0.9, "
                        "before self-attention in the UNet's full-resolution blocks; faster at large sizes, less "
                        "faithful (0.3-0.5 is typical). Default 0 (off). Changes nothing on SDXL (no attention "
                        "there); ignored for FLUX")
    s.add_argument("--ngms", dest="s_min_uncond", type=float, default=0.0, metavar="SIGMA",
                   help="A1111's Negative Guidance minimum sigma (a speed/quality trade-off): once the noise level "
                        "is below SIGMA, every other model evaluation runs the prompt without the negative prompt "
                        "(up to a quarter fewer UNet rows at the end of a run). Default 0 (off)")
    s.add_argument("--ngms-all-steps", dest="s_min_uncond_all", action="store_true", default=False,
                   help="with --ngms: every evaluation below SIGMA runs without the negative prompt")
    s.add_argument("--skip-early-cfg", dest="skip_early_cond", type=float, default=0.0, metavar="FRACTION",
                   help="A1111's Ignore negative prompt during early sampling: the first FRACTION (0-1) of the "
                        "model evaluations run without the negative prompt. Default 0 (off)")
    s.add_argument("--vae-decoder", dest="vae_decode_method", default="Full", metavar="full|taesd",
                   help="A1111's VAE type for decode: full (default, the checkpoint's VAE) or taesd, the tiny "
                        "autoencoder from the models folder's VAE-approx/ (taesd, taesdxl or taef1 "
                        "_decoder.safetensors): much faster, a little softer")
    s.add_argument("--vae-encoder", dest="vae_encode_method", default="Full", metavar="full|taesd",
                   help="A1111's VAE type for encode (img2img, inpainting, hires. fix in pixels): full (default) "
                        "or taesd (VAE-approx/..._encoder.safetensors)")
    s.add_argument("--freeu", nargs="?", const="", default=None, metavar="B1,B2,S1,S2",
                   help="FreeU, as ComfyUI's FreeU_V2 and Forge's FreeU Integrated (SD 1.x/2.x and SDXL): scale the "
                        "UNet decoder's backbone features by B1/B2 and its skip features' lowest frequencies by "
                        "S1/S2 (1 leaves each alone). Alone: Forge's 1.01,1.02,0.99,0.95; the FreeU authors suggest "
                        "1.3,1.4,0.9,0.2 for SD 1.x and SDXL. 'off' turns off an infotext's FreeU. Default: off")
    s.add_argument("--refiner", default=None, metavar="CHECKPOINT",
                   help="A1111's Refiner: finish the sampling with this checkpoint (a path, or a name in the models "
                        "folder): of the same family as --model, or Stability's SDXL refiner after an SDXL model")
    s.add_argument("--refiner-switch-at", dest="refiner_switch_at", type=float, default=None, metavar="SHARE",
                   help="when the refiner takes over: once this share of the noise schedule is passed, 0-1 "
                        "(default 0.8)")
    s.add_argument("--aesthetic-score", dest="aesthetic_score", type=float, default=6.0, metavar="SCORE",
                   help="the aesthetic score, 0-10, an SDXL refiner-architecture model (as the model or the "
                        "refiner) is conditioned on for the prompt (A1111's SDXL high aesthetic score; default 6)")
    s.add_argument("--sdxl-crop", default=None, metavar="TOP,LEFT",
                   help="A1111's SDXL crop top/left coordinate settings: the crop SDXL models are conditioned on, "
                        "in pixels (default 0,0: an uncropped picture)")
    s.add_argument("--negative-aesthetic-score", dest="negative_aesthetic_score", type=float, default=2.5,
                   metavar="SCORE", help="the same for the negative prompt (A1111's SDXL low aesthetic score; "
                                         "default 2.5)")
    s.add_argument("--restore-faces", dest="restore_faces", action="store_const", const=True, default=False,
                   help="A1111's Restore faces: restore each face of the finished picture (the models folder's "
                        "Codeformer/ or GFPGAN/ holds the restorer, and detection_Resnet50_Final.pth and "
                        "parsing_parsenet.pth, as in A1111)")
    s.add_argument("--face-restorer", dest="face_restoration_model", default="CodeFormer", metavar="NAME",
                   help="CodeFormer (default, as A1111) or GFPGAN")
    s.add_argument("--codeformer-weight", dest="code_former_weight", type=float, default=0.5, metavar="W",
                   help="A1111's CodeFormer weight: 0 restores most, 1 keeps most of the face (default 0.5)")
    s.add_argument("--tiling", action="store_true", default=False,
                   help="A1111's Tiling: a picture that tiles seamlessly, its right edge running on into the left "
                        "and its bottom into the top (SD 1.x/2.x and SDXL)")
    a = p.add_argument_group("face detailing", "ADetailer's face fix: each face of the finished picture inpainted "
                                               "again at the full size (found by detection_Resnet50_Final.pth, as "
                                               "face restoration finds them)")
    a.add_argument("--adetailer", nargs="?", const="face_yolov8n.pt", default=None, metavar="MODEL",
                   help="turn it on (MODEL is recorded as ADetailer's detection model; default face_yolov8n.pt)")
    a.add_argument("--adetailer-prompt", default=None, metavar="TEXT",
                   help="the faces' prompt (default: the prompt; [PROMPT] stands for it, [SEP] gives each face its own)")
    a.add_argument("--adetailer-negative-prompt", default=None, metavar="TEXT", help="the faces' negative prompt")
    a.add_argument("--adetailer-strength", type=float, default=None, metavar="S",
                   help="the faces' denoising strength (default 0.4)")
    a.add_argument("--adetailer-confidence", type=float, default=None, metavar="C",
                   help="the least detection score of a face (default 0.3)")
    a.add_argument("--adetailer-padding", type=int, default=None, metavar="PX",
                   help="pixels around each face inpainted with it (default 32)")
    a.add_argument("--adetailer-steps", type=int, default=None, metavar="N", help="the faces' steps (default: --steps)")
    a.add_argument("--adetailer-top-k", type=int, default=None, metavar="K",
                   help="inpaint only the first K finds (ADetailer's ad_mask_k; default 0: all)")
    a.add_argument("--adetailer-top-k-by", choices=("area", "confidence"), type=str.lower, default=None,
                   help="what puts a find first for --adetailer-top-k: the largest boxes (default) or the most "
                        "confident finds")
    a.add_argument("--adetailer-classes", default=None, metavar="NAMES",
                   help="a YOLO-World model's classes, separated by commas (ad_model_classes)")
    a.add_argument("--adetailer-restore-face", action="store_const", const=True, default=None,
                   help="restore faces after each find's pass (ad_restore_face)")
    a.add_argument("--adetailer-controlnet", default=None, metavar="MODEL",
                   help="a ControlNet for each find's pass, reading the picture being fixed (Passthrough: the "
                        "run's own --control units)")
    a.add_argument("--adetailer-controlnet-module", default=None, metavar="PREPROCESSOR",
                   help="its preprocessor (default: ADetailer's pick from the model's name)")
    a.add_argument("--adetailer-controlnet-weight", type=float, default=None, metavar="W",
                   help="its weight (default 1)")
    a.add_argument("--adetailer-checkpoint", default=None, metavar="CHECKPOINT",
                   help="another checkpoint for the finds' passes, named as --model takes it (ADetailer's separate "
                        "checkpoint; default: --model)")
    a.add_argument("--adetailer-vae", default=None, metavar="VAE",
                   help="another VAE for the finds' passes, named as --vae takes it, or None for the checkpoint's "
                        "own (ADetailer's separate VAE; default: the picture's)")

    r = p.add_argument_group("seed")
    r.add_argument("--seed", type=int, default=-1,
                   help="-1 (default) picks a random seed, which is recorded; the i-th picture of a run uses "
                        "seed + i, as in A1111")
    r.add_argument("--subseed", "--variation-seed", dest="subseed", type=int, default=-1,
                   help="A1111's Variation seed, mixed in by --subseed-strength (default -1: random)")
    r.add_argument("--subseed-strength", "--variation-strength", dest="subseed_strength", type=float, default=0.0,
                   help="A1111's Variation strength, 0-1: how much of the variation seed's noise (default 0: off)")
    r.add_argument("--seed-resize-from", metavar="WxH", default=None, help="make the noise at this size (A1111)")
    r.add_argument("--rng", choices=("gpu", "cpu", "nv"), default="gpu", type=str.lower,
                   help="noise source: gpu (torch on the device), cpu, or nv (NVIDIA's numbers on any device)")
    r.add_argument("--ensd", "--eta-noise-seed-delta", dest="ensd", type=int, default=0,
                   help="A1111's Eta noise seed delta (ENSD): added to the seed of ancestral/SDE samplers' "
                        "noise (default 0)")

    o = p.add_argument_group("size and output")
    o.add_argument("-W", "--width", type=int, default=None, help="output width (default: the input's, rounded to 8)")
    o.add_argument("-H", "--height", type=int, default=None, help="output height")
    if img2img:
        o.add_argument("--resize-mode", default="just-resize", choices=sorted(RESIZE_MODES),
                       type=a1111_choice(RESIZE_MODES, _RESIZE_LABELS),
                       help="how the input fits the output size (A1111's resize modes, also as A1111 spells "
                            "them: \"Crop and resize\")")
        o.add_argument("--img2img-upscaler", dest="img2img_upscaler", default=None, metavar="NAME",
                       help="A1111's Upscaler for img2img: what enlarges the input (and an inpaint "
                            "--inpaint-area only-masked crop) when the resize makes it larger: Lanczos, Nearest or "
                            "an upscaling model's name, as `underpaint upscale` takes them; default None: Lanczos "
                            "alone")
        o.add_argument("--img2img-color-correction", action="store_true", default=False,
                       help="A1111's \"Apply color correction to img2img results to match original colors\": match "
                            "the result's LAB histograms to the input's, keeping the result's own luminosity "
                            "(with --loopback, every pass to the input)")
    o.add_argument("--batch-size", type=int, default=1,
                   help="A1111's Batch size: pictures made together in one batch, 1-64 (default 1)")
    o.add_argument("--count", "--batch-count", "--n-iter", dest="count", type=int, default=1,
                   help="A1111's Batch count: how many batches to run one after another (default 1)")
    o.add_argument("-o", "--output", default=None,
                   help="output file (several images get -1, -2, ... suffixes) or folder (default ./outputs/<command>/)")
    o.add_argument("--overwrite", action="store_true", help="replace existing output files")

    if not img2img:
        _add_hires_args(p)
    add_cache_arguments(p)

    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", default=None, help="checkpoint: a path, or a name in the models folder")
    m.add_argument("--models-dir", default=None, help="models folder (default $UNDERPAINT_MODELS_DIR or ~/.local/share/underpaint/models)")
    m.add_argument("--vae", default=None, help="a separate VAE file to use instead of the checkpoint's")
    m.add_argument("--clip-l", dest="clip_l", default=None,
                   help="FLUX: the CLIP-L text encoder file (a path, or a name in the models folder's text_encoders/)")
    m.add_argument("--t5", default=None,
                   help="FLUX: the T5-XXL text encoder file (a path, or a name in the models folder's text_encoders/)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    m.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16 or fp32")
    m.add_argument("--prediction", choices=("eps", "v"), default=None, help="override the detected prediction type")
    add_memory_and_speed_arguments(m)

    from .control import add_control_arguments

    add_control_arguments(p)
    _record_defaults(p, img2img=img2img)


def _add_sd_upscale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SD upscale", "A1111's img2img script: enlarge the input, then repaint it in tiles of "
                                           "-W x -H (default: the model's native size) with the prompt")
    g.add_argument("--sd-upscale", type=float, default=None, metavar="FACTOR",
                   help="enlarge the input by this factor, 1-8 (A1111's Scale Factor), and repaint it tile by tile")
    g.add_argument("--sd-upscale-upscaler", default=None, metavar="NAME",
                   help="how to enlarge it first: Lanczos (default), Nearest, an upscaling model (e.g. 4x-UltraSharp), "
                        "or None (no enlargement, as in A1111)")
    g.add_argument("--sd-upscale-overlap", type=int, default=None, metavar="PX",
                   help="how far neighbouring tiles overlap, 0-256 px (default 64)")


def _with_sd_upscale(params: GenerationParams, args: argparse.Namespace, model) -> GenerationParams:
    """--sd-upscale and its flags as :class:`SDUpscaleOptions`; the tile size is -W x -H, else the
    model's native size (512 before the model is known)."""
    factor = getattr(args, "sd_upscale", None)
    if factor is None:
        for flag in ("sd_upscale_upscaler", "sd_upscale_overlap"):
            if getattr(args, flag, None) is not None:
                raise InvalidParameter(flag, getattr(args, flag), "--sd-upscale FACTOR beside it")
        return params
    from ..params import SDUpscaleOptions

    native = model.spec.default_size if model is not None and hasattr(model, "spec") else 512
    options = SDUpscaleOptions(scale=factor, upscaler=args.sd_upscale_upscaler or "Lanczos",
                               overlap=64 if args.sd_upscale_overlap is None else args.sd_upscale_overlap)
    return params.replace(sd_upscale=options, width=params.width or native, height=params.height or native)


def _add_loopback_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Loopback", "A1111's img2img script: run img2img again on its own result, each pass "
                                         "with the next seed (saved: a row of all passes, then each pass)")
    g.add_argument("--loopback", type=int, default=None, metavar="LOOPS",
                   help="how many passes, 1-100 (A1111's Loops; a batch size above 1 is taken as 1)")
    g.add_argument("--loopback-final-strength", type=float, default=None, metavar="STRENGTH",
                   help="the last pass's denoising strength, 0-1 (default 0.5); the first runs at --strength")
    g.add_argument("--loopback-curve", default=None, metavar="CURVE",
                   help="how the strength moves from --strength to the final one: Linear (default), Aggressive "
                        "(most of the change early) or Lazy (late)")
    g.add_argument("--loopback-interrogate", default=None, metavar="WHAT",
                   help="append a reading of each pass's picture to its prompt: None (default), CLIP or DeepBooru "
                        "(A1111's Append interrogated prompt at each iteration; see underpaint interrogate)")


def _with_loopback(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """--loopback and its flags as :class:`LoopbackOptions`."""
    loops = getattr(args, "loopback", None)
    if loops is None:
        for flag in ("loopback_final_strength", "loopback_curve", "loopback_interrogate"):
            if getattr(args, flag, None) is not None:
                raise InvalidParameter(flag, getattr(args, flag), "--loopback LOOPS beside it")
        return params
    from ..params import LoopbackOptions

    options = LoopbackOptions(loops=loops, curve=args.loopback_curve or "Linear",
                              interrogate=args.loopback_interrogate or "None",
                              final_strength=0.5 if args.loopback_final_strength is None else args.loopback_final_strength)
    return params.replace(loopback=options)


def _add_xyz_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("X/Y/Z plot", "A1111's script: one picture per combination of the axes' values, in a "
                                           "labelled grid (saved first; the cells follow with --xyz-cells)")
    for letter in "xyz":
        g.add_argument(f"--xyz-{letter}", dest=f"xyz_{letter}", default=None, metavar="TYPE",
                       help=f"the {letter.upper()} axis's type in A1111's spelling: Seed, Var. seed, Var. strength, "
                            "Steps, CFG Scale, Denoising, Sampler, Schedule type, Prompt S/R, Clip skip, Eta, Token "
                            "merging ratio, Hires steps, Hires sampler, Hires upscaler, Checkpoint name (values as "
                            "--model takes them), VAE (Automatic, None, or as --vae takes them)" if letter == "x" else
                       f"the {letter.upper()} axis's type (as --xyz-x)")
        g.add_argument(f"--xyz-{letter}-values", dest=f"xyz_{letter}_values", default=None, metavar="VALUES",
                       help=f"the {letter.upper()} values, comma-separated, with ranges: 1-5, 1-10 (+2), 1-10 [4], "
                            "5-9 (+0.5); quote a value that has a comma (\"a, b\")" if letter == "x" else
                       f"the {letter.upper()} values (as --xyz-x-values)")
    g.add_argument("--xyz-cells", action="store_true", help="also save each cell's picture (A1111's Include Sub Images)")
    g.add_argument("--xyz-sub-grids", action="store_true",
                   help="with several Z values, also save each Z value's grid (A1111's Include Sub Grids)")
    g.add_argument("--xyz-no-legend", action="store_true", help="no labels (A1111's Draw legend off)")
    g.add_argument("--xyz-keep-seeds", action="store_true",
                   help="a -1 seed gives every cell a random seed of its own (A1111's Keep -1 for seeds)")
    g.add_argument("--xyz-vary-seeds", default=None, metavar="AXES",
                   help="add the cell's index along these axes to the seed: x, y, z or several (e.g. xy)")
    g.add_argument("--xyz-margin", dest="xyz_margin", type=int, default=None, metavar="PX",
                   help="pixels between the pictures of a labelled grid, 0-500 (default 0)")


_XYZ_FLAGS = ("xyz_x_values", "xyz_y", "xyz_y_values", "xyz_z", "xyz_z_values", "xyz_cells", "xyz_sub_grids",
              "xyz_no_legend", "xyz_keep_seeds", "xyz_vary_seeds", "xyz_margin")


def _with_xyz_plot(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """--xyz-* as :class:`XYZPlotOptions` (--xyz-x, or --xyz-y or --xyz-z, turns the plot on)."""
    if not any(getattr(args, f"xyz_{letter}", None) for letter in "xyz"):
        for flag in _XYZ_FLAGS:
            if getattr(args, flag, None) not in (None, False):
                raise InvalidParameter(flag, getattr(args, flag), "--xyz-x TYPE (or --xyz-y, --xyz-z) beside it")
        return params
    from ..params import XYZPlotOptions

    fields = {}
    for letter in "xyz":
        kind, values = getattr(args, f"xyz_{letter}"), getattr(args, f"xyz_{letter}_values")
        if values is not None and not kind:
            raise InvalidParameter(f"xyz_{letter}_values", values, f"--xyz-{letter} TYPE beside it")
        if kind and kind.strip().lower() != "nothing" and values is None:
            raise InvalidParameter(f"xyz_{letter}", kind, f"--xyz-{letter}-values VALUES beside it")
        fields[f"{letter}_type"], fields[f"{letter}_values"] = kind or "Nothing", values or ""
    vary = (args.xyz_vary_seeds or "").lower().replace(",", "")
    if set(vary) - set("xyz"):
        raise InvalidParameter("xyz_vary_seeds", args.xyz_vary_seeds, "axes among x, y and z (e.g. xy)")
    if any(fields[f"{letter}_type"].strip().lower() == "styles" for letter in "xyz"):
        from ..prompts.styles import read_styles

        fields["styles"] = read_styles(styles_file(args))
    options = XYZPlotOptions(**fields, draw_legend=not args.xyz_no_legend, include_lone_images=args.xyz_cells,
                             include_sub_grids=args.xyz_sub_grids, no_fixed_seeds=args.xyz_keep_seeds,
                             vary_seeds_x="x" in vary, vary_seeds_y="y" in vary, vary_seeds_z="z" in vary,
                             margin_size=args.xyz_margin or 0)
    return params.replace(xyz_plot=options)


def _add_prompt_script_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Prompt matrix", "A1111's script: the prompt cut at each | into a first part and parts "
                                              "each picture has or not, a picture for every combination (saved: the "
                                              "labelled grid, then each picture)")
    g.add_argument("--prompt-matrix", action="store_true", help="turn it on (\"a cat|red|in a hat\": 4 pictures)")
    g.add_argument("--prompt-matrix-negative", action="store_true",
                   help="cut the negative prompt instead (A1111's Select prompt: negative)")
    g.add_argument("--prompt-matrix-at-start", action="store_true",
                   help="put the chosen parts before the first part (A1111's Put variable parts at start of prompt)")
    g.add_argument("--prompt-matrix-different-seeds", action="store_true",
                   help="picture i takes the seed + i (A1111's Use different seed for each picture)")
    g.add_argument("--prompt-matrix-joiner", default=None, choices=("comma", "space"),
                   help="what joins the parts: comma (\", \", the default) or space")
    g.add_argument("--prompt-matrix-margin", type=int, default=None, metavar="PX",
                   help="pixels between the grid's pictures, 0-500 (default 0)")
    f = p.add_argument_group("Prompts from file", "A1111's script \"Prompts from file or textbox\": a request per line "
                                                  "of a text file, each a prompt or options such as --prompt \"a cat\" "
                                                  "--steps 30 --cfg_scale 5 (saved: every line's pictures in turn)")
    f.add_argument("--prompts-from", default=None, metavar="FILE",
                   help="the text file (UTF-8; - reads standard input)")
    f.add_argument("--prompts-at", default=None, choices=("start", "end"),
                   help="where a line's prompt goes beside --prompt: start (the default) or end")
    f.add_argument("--prompts-iterate-seed", action="store_true",
                   help="move the seed on by batch size x count after each line (A1111's Iterate seed every line)")
    f.add_argument("--prompts-same-seed", action="store_true",
                   help="one random seed for every line when --seed is -1 (A1111's Use same random seed for all lines)")
    f.add_argument("--prompts-combined", action="store_true",
                   help="also save a grid of all the pictures, first (Forge's Make a combined image)")


_MATRIX_FLAGS = ("prompt_matrix_negative", "prompt_matrix_at_start", "prompt_matrix_different_seeds",
                 "prompt_matrix_joiner", "prompt_matrix_margin")
_PROMPTS_FLAGS = ("prompts_at", "prompts_iterate_seed", "prompts_same_seed", "prompts_combined")


def _with_prompt_scripts(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """--prompt-matrix and --prompts-from as their options; --style then styles each prompt they make."""
    for switch, flags, needed in (("prompt_matrix", _MATRIX_FLAGS, "--prompt-matrix"),
                                  ("prompts_from", _PROMPTS_FLAGS, "--prompts-from FILE")):
        if not getattr(args, switch, None):
            for flag in flags:
                if getattr(args, flag, None) not in (None, False):
                    raise InvalidParameter(flag, getattr(args, flag), f"{needed} beside it")
    styles = _styler(args)
    matrix = lines = None
    if getattr(args, "prompt_matrix", False):
        from ..params import PromptMatrixOptions

        matrix = PromptMatrixOptions(
            put_at_start=args.prompt_matrix_at_start, different_seeds=args.prompt_matrix_different_seeds,
            prompt_type="negative" if args.prompt_matrix_negative else "positive",
            joiner=args.prompt_matrix_joiner or "comma", margin_size=args.prompt_matrix_margin or 0, styles=styles)
    if getattr(args, "prompts_from", None):
        from ..params import PromptsFromFileOptions
        from ..prompts.styles import read_styles

        book = read_styles(styles_file(args))
        if getattr(args, "prompts_text", None) is None:  # read once: standard input cannot be read twice
            args.prompts_text = _read_text(args.prompts_from, "prompts_from")
        lines = PromptsFromFileOptions(
            text=args.prompts_text, iterate_seed=args.prompts_iterate_seed,
            same_seed=args.prompts_same_seed, position=args.prompts_at or "start", combined=args.prompts_combined,
            styles=styles, style_book=book)
    if matrix is None and lines is None:
        return params
    return params.replace(prompt_matrix=matrix, prompts_from_file=lines)


def _styler(args: argparse.Namespace):
    """--style as a function of the prompts (None: no --style), the names checked now."""
    names = getattr(args, "styles", None)
    if not names:
        return None
    from ..prompts.styles import read_styles

    return read_styles(styles_file(args)).styler(names, field="--style")


def _read_text(name: str, field: str) -> str:
    """A text file's contents (``-``: standard input), as UTF-8; a file that is not there or not text is refused."""
    if name == "-":
        return sys.stdin.read()
    path = Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParameter(field, name, "a text file that exists") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameter(field, name, f"a readable UTF-8 text file ({exc.__class__.__name__}: {exc})") from None


class _AnyCheckpoint:
    """Takes a line's --sd_model as it is, to count pictures before the models are looked up."""

    @staticmethod
    def checkpoint(value: str, field: str) -> str:
        return value


def _output_count(params: GenerationParams) -> int:
    """How many pictures a request saves (an X/Y/Z plot: its grids and, if asked, its cells)."""
    if params.prompt_matrix is not None:
        from ..pipeline.prompt_matrix import requests

        return 1 + len(requests(params))
    if params.prompts_from_file is not None:
        from ..pipeline.prompts_file import plan

        jobs = [job.params for job in plan(params, _AnyCheckpoint())]
        return sum(job.batch_size * job.n_iter for job in jobs) + int(params.prompts_from_file.combined)
    options = params.xyz_plot
    if options is None:
        return params.batch_size * params.n_iter
    from ..pipeline.xyz_plot import parse_axis_values

    nx, ny, nz = (len(parse_axis_values(getattr(options, f"{a}_type"), getattr(options, f"{a}_values")))
                  for a in "xyz")
    grids = 1 + (nz if nz > 1 and options.include_sub_grids else 0)
    return grids + (nx * ny * nz if options.include_lone_images else 0)


def _add_hires_args(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("hires. fix", "A1111's Hires. fix: the first picture is upscaled and painted over "
                                           "again at the larger size (any --hires-* flag turns it on)")
    h.add_argument("--hires", action=argparse.BooleanOptionalAction, default=None,
                   help="turn hires. fix on with its defaults; --no-hires turns off one taken from --from-infotext")
    h.add_argument("--hires-scale", type=float, default=None, metavar="X",
                   help="upscale the first picture by this (default 2)")
    h.add_argument("--hires-resize", metavar="WxH", default=None,
                   help="upscale to this size instead; 0 for one side keeps the aspect ratio, both given crop "
                        "to fit (A1111's 'Resize width/height to')")
    h.add_argument("--hires-upscaler", default=None, metavar="NAME",
                   help="how to upscale: " + ", ".join(HIRES_UPSCALERS) + ", or an upscaling model in the "
                        "models folder's upscale_models/ (A1111: models/ESRGAN, models/RealESRGAN, models/SwinIR) "
                        "by name, e.g. 4x-UltraSharp or 'R-ESRGAN 4x+' (default Latent)")
    h.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="steps of the second pass, run whatever the strength (default 0: as many as --steps)")
    h.add_argument("--hires-strength", "--hires-denoising-strength", dest="hires_strength", type=float,
                   default=None, metavar="S", help="denoising strength of the second pass (default 0.7)")
    h.add_argument("--hires-sampler", default=None, metavar="NAME",
                   help="sampler of the second pass (default: --sampler)")
    h.add_argument("--hires-scheduler", "--hires-schedule-type", dest="hires_scheduler", default=None,
                   metavar="NAME",
                   help="schedule type of the second pass (default: --scheduler)")
    h.add_argument("--hires-prompt", default=None, metavar="TEXT", help="prompt of the second pass (default: --prompt)")
    h.add_argument("--hires-checkpoint", default=None, metavar="CHECKPOINT",
                   help="A1111's Hires checkpoint: another checkpoint of the same family (a path, or a name in the "
                        "models folder) encodes the upscaled picture and runs the second pass (default: the same)")
    h.add_argument("--hires-refiner-pass", dest="hires_refiner_pass", default=None,
                   choices=("first", "second", "both"),
                   help="A1111's \"Hires fix: which pass to enable refiner for\": the pass(es) --refiner takes part "
                        "in (default: second)")
    h.add_argument("--hires-negative-prompt", default=None, metavar="TEXT",
                   help="negative prompt of the second pass (default: --negative-prompt)")
    h.add_argument("--hires-token-merging", "--hires-token-merging-ratio", dest="hires_token_merging", type=float,
                   default=None, metavar="RATIO",
                   help="token merging ratio of the second pass, 0-0.9 (default 0: as --token-merging)")


# --hires-* flag → HiresOptions field.
_HIRES_FLAGS = (("hires_scale", "scale"), ("hires_upscaler", "upscaler"), ("hires_steps", "steps"),
                ("hires_strength", "strength"), ("hires_sampler", "sampler"), ("hires_scheduler", "scheduler"),
                ("hires_prompt", "prompt"), ("hires_negative_prompt", "negative_prompt"),
                ("hires_token_merging", "token_merging_ratio"), ("hires_checkpoint", "checkpoint"))


def add_memory_and_speed_arguments(group) -> None:
    """``--vram``, ``--optimize``, ``--attention`` and ``--vae-precision``: how a loaded model uses the GPU
    (also ``serve``'s)."""
    group.add_argument("--vram", choices=VRAM_MODES, default="high",
                       help="GPU memory mode: high keeps everything on the GPU (default); medium keeps the text "
                            "encoders and VAE in RAM until they run; low also moves the UNet to the GPU block by "
                            "block and decodes in tiles (slowest, least memory)")
    group.add_argument("--optimize", default="", metavar="LIST",
                       help="speed switches, comma-separated: channels_last, fused_qkv, compile (torch.compile, "
                            "kernels cached on disk), cuda_graphs (CUDA only), aot (the UNet or FLUX transformer "
                            "compiled ahead of time into packages on disk: a restart loads them without tracing), "
                            "fp8 (LOSSY, changes "
                            "the picture: it trades quality for speed, fp8 matmuls on GPUs of compute capability 8.9+); "
                            "none by default")
    group.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                       help="attention kernel for the UNet/transformer (default auto: PyTorch picks per shape)")
    group.add_argument("--vae-precision", dest="vae_precision", default="auto",
                       choices=VAE_PRECISIONS,
                       help="dtype of the VAE's encode and decode: auto (default) runs SDXL's and FLUX's VAE, when "
                            "the model is fp16, in bf16 on NVIDIA GPUs from Ampere on (as ComfyUI) and in fp32 "
                            "elsewhere, others in the model's dtype; fp32 always (A1111's "
                            "--no-half-vae); fp16 even for SDXL's, faster, a result with NaN/inf is redone in fp32; "
                            "bf16 (ComfyUI's --bf16-vae), faster and does not overflow. fp16 and bf16 change the "
                            "picture slightly")


# Flags an infotext can set; ``--from-infotext`` uses its values except for the flags given.
_OVERRIDABLE = ("prompt", "negative_prompt", "strength", "steps", "cfg_scale", "distilled_cfg_scale", "image_cfg_scale",
                "sampler",
                "scheduler", "clip_skip",
                "eta", "s_churn", "s_noise", "seed", "subseed", "subseed_strength", "seed_resize_from", "rng", "ensd",
                "width", "height", "token_merging", "s_min_uncond", "s_min_uncond_all", "skip_early_cond",
                "vae_encode_method", "vae_decode_method", "tiling", "noise_multiplier", "extra_noise", "unipc_order",
                "sgm_noise_multiplier", "beta_alpha", "beta_beta", "restore_faces",
                "face_restoration_model")
# GenerationParams field → the flag that sets it (where the names differ).
_FLAG_OF_FIELD = {"seed_resize_from_w": "seed_resize_from", "seed_resize_from_h": "seed_resize_from",
                  "eta_noise_seed_delta": "ensd", "token_merging_ratio": "token_merging"}


def _record_defaults(p: argparse.ArgumentParser, *, img2img: bool) -> None:
    """Parse the flags an infotext can set with None as default, keeping the real defaults aside
    (``flag_defaults``), so that a flag the user gave is told apart from one left at its default."""
    dests = [d for d in _OVERRIDABLE if img2img or d not in ("strength", "image_cfg_scale")]
    defaults = {d: p.get_default(d) for d in dests}
    p.set_defaults(**dict.fromkeys(dests), flag_defaults=defaults)


def _resolve_defaults(args: argparse.Namespace, model_defaults: dict | None = None
                      ) -> tuple[argparse.Namespace, set[str]]:
    """The arguments with recorded defaults filled in, and the flags the user gave.

    ``model_defaults`` replace the generic defaults for the loaded model's family (FLUX).
    """
    defaults = getattr(args, "flag_defaults", None) or {}
    if model_defaults:
        defaults = {**defaults, **{k: v for k, v in model_defaults.items() if k in defaults}}
    given = {d for d in defaults if getattr(args, d, None) is not None}
    resolved = argparse.Namespace(**vars(args))
    for dest, value in defaults.items():
        if getattr(resolved, dest, None) is None:
            setattr(resolved, dest, value)
    return resolved, given


def _seed_resize(value: str | None) -> tuple[int, int]:
    if not value:
        return 0, 0
    return _size_flag("--seed-resize-from", value)


def _size_flag(flag: str, value: str) -> tuple[int, int]:
    try:
        w, h = value.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise InvalidParameter(flag, value, "WIDTHxHEIGHT, e.g. 512x768") from None


def _sdxl_crop(text: str | None) -> dict[str, int]:
    if text is None:
        return {}
    try:
        top, left = (int(part) for part in text.split(","))
    except ValueError:
        raise InvalidParameter("--sdxl-crop", text, "two whole numbers TOP,LEFT (e.g. 0,0)") from None
    return {"sdxl_crop_top": top, "sdxl_crop_left": left}


def _with_refiner(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """``--refiner``, ``--refiner-switch-at`` and ``--hires-refiner-pass`` over the request (and over what
    an infotext brought)."""
    from ..params import RefinerOptions

    checkpoint, switch_at = getattr(args, "refiner", None), getattr(args, "refiner_switch_at", None)
    which = getattr(args, "hires_refiner_pass", None)
    if checkpoint is None:
        if switch_at is None and which is None:
            return params
        if params.refiner is None:
            flag, value = ("--refiner-switch-at", switch_at) if switch_at is not None else ("--hires-refiner-pass", which)
            raise InvalidParameter(flag, value, "--refiner CHECKPOINT beside it")
        checkpoint = params.refiner.checkpoint
    if switch_at is None:
        switch_at = params.refiner.switch_at if params.refiner is not None else 0.8
    if which is None:
        which = params.refiner.hires_pass if params.refiner is not None else "second pass"
    try:
        return params.replace(refiner=RefinerOptions(checkpoint, switch_at, which))
    except InvalidParameter as exc:
        raise InvalidParameter("--refiner-switch-at" if exc.field == "refiner_switch_at" else "--refiner", exc.value,
                               exc.expected) from None


_DETAILER_FLAGS = {"adetailer_prompt": "prompt", "adetailer_negative_prompt": "negative_prompt",
                   "adetailer_strength": "denoising_strength", "adetailer_confidence": "confidence",
                   "adetailer_padding": "inpaint_only_masked_padding", "adetailer_steps": "steps",
                   "adetailer_top_k": "mask_k", "adetailer_top_k_by": "mask_filter_method",
                   "adetailer_classes": "model_classes", "adetailer_restore_face": "restore_face",
                   "adetailer_controlnet": "controlnet_model", "adetailer_controlnet_module": "controlnet_module",
                   "adetailer_controlnet_weight": "controlnet_weight", "adetailer_checkpoint": "checkpoint",
                   "adetailer_vae": "vae"}


def _with_detailer(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """--adetailer and its flags as one ADetailer tab."""
    if getattr(args, "adetailer", None) is None:
        for flag in _DETAILER_FLAGS:
            if getattr(args, flag, None) is not None:
                raise InvalidParameter(flag, getattr(args, flag), "--adetailer beside it")
        return params
    from ..params import DetailerUnit
    from ..pipeline.detailer import check_unit

    fields = {field: getattr(args, flag) for flag, field in _DETAILER_FLAGS.items() if getattr(args, flag) is not None}
    try:
        unit = DetailerUnit(model=args.adetailer, **fields)
    except InvalidParameter as exc:
        flag = next((f for f, name in _DETAILER_FLAGS.items() if f"ad_{name}" == exc.field), "adetailer")
        raise InvalidParameter(flag, exc.value, exc.expected) from None
    check_unit(unit, field="adetailer", folder=models_folder(args) if hasattr(args, "models_dir") else None)
    return params.replace(detailer=(unit,))


def _with_freeu(params: GenerationParams, given: str | None) -> GenerationParams:
    """``--freeu`` over the request (and over what an infotext brought): four factors, none (the
    defaults) or ``off``."""
    if given is None:
        return params
    if given.strip().lower() == "off":
        return params.replace(freeu=None)
    if not given.strip():
        return params.replace(freeu=FreeUOptions())
    try:
        b1, b2, s1, s2 = (float(part) for part in given.split(","))
    except ValueError:
        raise InvalidParameter("--freeu", given, "four numbers B1,B2,S1,S2 (e.g. 1.3,1.4,0.9,0.2), none, or off") from None
    try:
        return params.replace(freeu=FreeUOptions(b1=b1, b2=b2, s1=s1, s2=s2))
    except InvalidParameter as exc:
        raise InvalidParameter("--freeu", given, f"factors from 0 to {MAX_FREEU:g} ({exc.field} is {exc.value})") from None


def params_from_args(args: argparse.Namespace, init_images: tuple = (), *, model=None) -> GenerationParams:
    """The request the flags describe; with the loaded ``model``, unset flags take its family's defaults."""
    from ..pipeline.flux import family_defaults

    args, given = _resolve_defaults(args, family_defaults(model) if model is not None else None)
    w, h = _seed_resize(args.seed_resize_from)
    params = GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        init_images=init_images,
        strength=getattr(args, "strength", 1.0),
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        distilled_cfg_scale=args.distilled_cfg_scale,
        image_cfg_scale=1.5 if getattr(args, "image_cfg_scale", None) is None else args.image_cfg_scale,
        sampler=args.sampler,
        scheduler=args.scheduler,
        seed=args.seed,
        subseed=args.subseed,
        subseed_strength=args.subseed_strength,
        seed_resize_from_w=w,
        seed_resize_from_h=h,
        width=args.width,
        height=args.height,
        resize_mode=RESIZE_MODES[getattr(args, "resize_mode", "just-resize")],
        batch_size=args.batch_size,
        n_iter=args.count,
        clip_skip=args.clip_skip,
        rng=args.rng,
        eta_noise_seed_delta=args.ensd,
        token_merging_ratio=args.token_merging,
        s_min_uncond=args.s_min_uncond,
        s_min_uncond_all=args.s_min_uncond_all,
        skip_early_cond=args.skip_early_cond,
        vae_encode_method=args.vae_encode_method,
        vae_decode_method=args.vae_decode_method,
        tiling=args.tiling,
        prompt_comments=args.prompt_comments,
        fix_steps=getattr(args, "fix_steps", False),
        img2img_upscaler=getattr(args, "img2img_upscaler", None),
        img2img_color_correction=getattr(args, "img2img_color_correction", False),
        noise_multiplier=1.0 if getattr(args, "noise_multiplier", None) is None else args.noise_multiplier,
        extra_noise=args.extra_noise,
        aesthetic_score=args.aesthetic_score,
        **_sdxl_crop(args.sdxl_crop),
        negative_aesthetic_score=args.negative_aesthetic_score,
        sampler_options=SamplerOptions(eta=args.eta, s_churn=args.s_churn, s_noise=args.s_noise,
                                       unipc_order=args.unipc_order, beta_alpha=args.beta_alpha,
                                       beta_beta=args.beta_beta),
        sgm_noise_multiplier=bool(getattr(args, "sgm_noise_multiplier", False)),
        restore_faces=bool(args.restore_faces),
        face_restoration_model=args.face_restoration_model,
        code_former_weight=args.code_former_weight,
        control_units=control_units_from_args(args),
    )
    if getattr(args, "from_infotext", None):
        params = _with_infotext(params, args, given)
    params = _with_hires(params, args)
    params = _with_sd_upscale(params, args, model)
    params = _with_loopback(params, args)
    params = _with_xyz_plot(params, args)
    params = _with_prompt_scripts(params, args)
    params = with_cache(params, args)
    params = _with_freeu(params, getattr(args, "freeu", None))
    params = _with_detailer(params, args)
    params = _with_refiner(params, args)
    params = _with_loras(params, getattr(args, "lora", None), getattr(args, "hypernet", None))
    return _with_styles(params, args)


def _with_styles(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """``--style NAME``s applied in order to the prompts, as A1111 applies the styles chosen in its UI
    (prompts/styles.py); a hires. prompt of its own is styled too, an empty one follows the prompt."""
    names = getattr(args, "styles", None)
    if not names or params.prompt_matrix is not None or params.prompts_from_file is not None:
        return params  # the scripts style each prompt they make
    from dataclasses import replace

    from ..prompts.styles import read_styles

    book = read_styles(styles_file(args))
    prompt, negative_prompt = book.apply(names, params.prompt, params.negative_prompt, field="--style")
    params = params.replace(prompt=prompt, negative_prompt=negative_prompt)
    hires = params.hires
    if hires is not None and (hires.prompt or hires.negative_prompt):
        hr_prompt, hr_negative = book.apply(names, hires.prompt, hires.negative_prompt, field="--style")
        params = params.replace(hires=replace(hires, prompt=hr_prompt if hires.prompt else "",
                                              negative_prompt=hr_negative if hires.negative_prompt else ""))
    return params


def styles_file(args: argparse.Namespace) -> Path:
    """``--styles-file``, else styles.csv beside the models folder (underpaint/locations.py)."""
    from ..locations import default_styles_file

    if getattr(args, "styles_file", None):
        return Path(args.styles_file).expanduser()
    return default_styles_file(Path(args.models_dir).expanduser() if getattr(args, "models_dir", None) else None)


def _with_hires(params: GenerationParams, args: argparse.Namespace) -> GenerationParams:
    """The --hires-* flags over the hires. fix an infotext brought (or over the defaults)."""
    from dataclasses import replace

    switch = getattr(args, "hires", None)
    if switch is False:
        return params.replace(hires=None)
    changes = {name: getattr(args, dest) for dest, name in _HIRES_FLAGS if getattr(args, dest, None) is not None}
    if getattr(args, "hires_resize", None) is not None:
        changes["resize_x"], changes["resize_y"] = _size_flag("--hires-resize", args.hires_resize)
    elif "scale" in changes:  # a scale given here wins over a resize from an infotext
        changes["resize_x"] = changes["resize_y"] = 0
    if not changes and not switch:
        return params
    return params.replace(hires=replace(params.hires or HiresOptions(), **changes))


def _with_infotext(params: GenerationParams, args: argparse.Namespace, given: set[str]) -> GenerationParams:
    """The infotext's values for every field whose flag was not given (A1111's "Send to img2img")."""
    from dataclasses import replace

    from ..pipeline.reproduce import params_from_infotext, read_infotext

    fields = params_from_infotext(read_infotext(args.from_infotext))
    if not params.is_img2img:
        fields.pop("strength", None)  # txt2img: the hires. fix strength, in fields["hires"]
    else:
        fields.pop("hires", None)
    fields = {k: v for k, v in fields.items() if _FLAG_OF_FIELD.get(k, k) not in given}
    options = fields.pop("sampler_options")
    fields["sampler_options"] = replace(options, **{k: getattr(args, k) for k in (
        "eta", "s_churn", "s_noise", "unipc_order", "beta_alpha", "beta_beta") if k in given})
    return params.replace(**fields)


def _with_loras(params: GenerationParams, loras: list[str] | None, hypernets: list[str] | None = None
                ) -> GenerationParams:
    """``--lora NAME:WEIGHT`` and ``--hypernet NAME:STRENGTH`` as A1111 adds a network chosen outside the
    prompt: its tag appended to the prompt."""
    if not loras and not hypernets:
        return params
    from ..models.hypernetwork import HypernetworkRequest
    from ..models.lora import LoraRequest

    tags = [LoraRequest.parse(text).tag() for text in loras or ()]
    tags += [HypernetworkRequest.parse(text).tag() for text in hypernets or ()]
    return params.replace(prompt=params.prompt + "".join(tags))


def _load_engine(args: argparse.Namespace, checkpoint: Path | None = None, vae: "str | Path | None" = None):
    """The engine the flags describe; ``checkpoint`` and ``vae`` (an X/Y/Z plot's) in place of
    --model and --vae, loaded with the same device, dtype, memory and speed settings."""
    from ..pipeline.engine import Engine

    folder = models_folder(args)
    return Engine.load(checkpoint or _checkpoint(args, folder), models_dir=folder.root, device=args.device,
                       dtype=args.dtype, vae=vae if checkpoint is not None else args.vae, prediction=args.prediction,
                       clip_l=getattr(args, "clip_l", None), t5=getattr(args, "t5", None),
                       vram=getattr(args, "vram", "high"), optimize=getattr(args, "optimize", None),
                       attention=getattr(args, "attention", None),
                       vae_precision=getattr(args, "vae_precision", None))


def _engine_for(args: argparse.Namespace, probe: GenerationParams):
    """The engine that runs the request: the one of --model, or for an X/Y/Z plot with a
    Checkpoint name or VAE axis a :class:`PlotModels` that switches between them (its names are
    looked up here, before any model loads, so an unknown one stops the command at once)."""
    from ..pipeline import prompts_file, xyz_plot

    if not xyz_plot.switches_models(probe):
        return _load_engine(args)
    models = PlotModels(args)
    if probe.prompts_from_file is not None:
        first = prompts_file.plan(probe, models.names)[0]
    else:
        work = xyz_plot.plan(probe, models.names)
        first = work.cells[work.order[0]]
    models.slot.engine_for(first.checkpoint, first.vae)  # the model the first cell runs on: loaded once
    return models


class PlotModels:
    """The checkpoints and VAEs of an X/Y/Z plot's "Checkpoint name" and "VAE" axes, for the CLI.

    A Checkpoint name value is what ``--model`` takes (a path, or a name in the models folder); a
    VAE value "Automatic" (A1111's: the VAE file named like the checkpoint, else its own), "None"
    (the checkpoint's own) or what ``--vae`` takes. Each checkpoint loads with the command's
    settings and ``--vae``; a VAE-only change swaps the VAE's weights into the running model
    (``Engine.use_vae``), as the server's engine slot does (which holds the one engine here too).
    Stands in for the engine: ``model`` is the loaded one's, ``generate`` runs the plot.
    """

    def __init__(self, args: argparse.Namespace):
        from ..pipeline.xyz_plot import ModelNames
        from ..server.engine_slot import EngineSlot

        self.args = args
        self.folder = models_folder(args)
        self.checkpoint = _checkpoint(args, self.folder)
        self.vae = Path(self.folder.resolve_vae(args.vae)) if args.vae else None
        self.slot = EngineSlot(lambda path, vae=None: _load_engine(args, path, vae), lambda: self.checkpoint,
                               self._vae_file)
        self.names = ModelNames(checkpoint=self._find_checkpoint, vae=self._find_vae)

    @property
    def model(self):
        return self.slot.engine_for().model

    def _find_checkpoint(self, value: str, field: str) -> Path:
        from ..errors import ModelNotFound

        try:
            return Path(self.folder.resolve_checkpoint(value))
        except ModelNotFound as exc:
            raise InvalidParameter(field, value, f"a checkpoint path or a name in the models folder ({exc.message})"
                                   ) from None

    def _find_vae(self, value: str, field: str) -> "str | Path":
        from ..errors import ModelNotFound
        from ..server.catalog import AUTOMATIC_VAE, NO_VAE

        if value in (AUTOMATIC_VAE, NO_VAE):
            return value
        try:
            return Path(self.folder.resolve_vae(value))
        except ModelNotFound as exc:
            raise InvalidParameter(field, value, f"Automatic, None, a VAE file or a name in the models folder's vae/ "
                                                 f"({exc.message})") from None

    def _vae_file(self, checkpoint: Path, choice: "str | Path | None") -> Path | None:
        """The VAE file a cell on ``checkpoint`` loads for its VAE value (None: --vae's)."""
        from ..server.catalog import AUTOMATIC_VAE, NO_VAE, named_like

        if choice is None:
            return self.vae
        if choice == NO_VAE:
            return None
        if choice == AUTOMATIC_VAE:
            found = named_like(checkpoint, self.folder.list_vaes())
            return Path(found) if found is not None else None
        return Path(choice)

    def generate(self, params: GenerationParams, *, progress=None, cancel=None):
        from ..pipeline import prompts_file, xyz_plot

        def cell_job(cell, report):
            return self.slot.engine_for(cell.checkpoint, cell.vae).generate(cell.params, progress=report,
                                                                            cancel=cancel)

        script = prompts_file if params.prompts_from_file is not None else xyz_plot
        return script.run(cell_job, params, info=self.slot.info, progress=progress, cancel=cancel,
                          models=self.names)


def _checkpoint(args: argparse.Namespace, folder) -> Path:
    """``--model``, else the checkpoint ``--from-infotext`` names, else the first one on disk."""
    from ..errors import ModelNotFound

    if args.model is not None or not getattr(args, "from_infotext", None):
        return resolve_model(args.model, folder)
    from ..pipeline.reproduce import checkpoint_from_infotext, read_infotext

    name = checkpoint_from_infotext(read_infotext(args.from_infotext))
    try:
        return resolve_model(name, folder)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{exc.message} (named by --from-infotext; pass --model to use another)",
                            field=exc.field) from None


def models_folder(args: argparse.Namespace):
    from ..models.registry import ModelsDir, default_models_dir

    return ModelsDir(Path(args.models_dir).expanduser() if args.models_dir else default_models_dir())


def resolve_model(name: str | None, folder) -> Path:
    """The checkpoint to load: the named one, a known hub model fetched on first use, or the first on disk."""
    from ..errors import ModelNotFound
    from ..models.download import KNOWN_MODELS, download

    if name is None:
        entries = folder.list_checkpoints()
        if not entries:
            raise ModelNotFound(
                f"no checkpoint found in {folder.root}: pass --model PATH, put a .safetensors file in its "
                "checkpoints/ folder, or run `underpaint download sd15`"
            )
        return Path(entries[0].path)
    try:
        return Path(folder.resolve_checkpoint(name))
    except ModelNotFound:
        if name in KNOWN_MODELS:
            return Path(download(name, folder.root))
        raise


def _inputs(path: str) -> list[Path]:
    from ..imageio.load import list_images

    source = Path(path).expanduser()
    if source.is_dir():
        found = list_images(source)
        if not found:
            raise ImageError(f"{source}: the folder has no images (expected .png, .jpg, .jpeg or .webp files)")
        return found
    return [source]


def warn_about_request(args: argparse.Namespace) -> None:
    """One ``underpaint: warning:`` line for each thing in the request that will not do what its
    words suggest: an infotext recording an A1111 feature underpaint lacks (the picture will differ
    from the one it came from), and a schedule in the sampler's name overruling ``--scheduler``."""
    from ..sampling.names import schedule_in_name, schedule_info

    if getattr(args, "from_infotext", None):
        from ..pipeline.reproduce import read_infotext, unavailable_features

        missing = unavailable_features(read_infotext(args.from_infotext))
        if missing:
            print(f"underpaint: warning: --from-infotext: {args.from_infotext} was made with {' and '.join(missing)}, "
                  "which underpaint does not have: the picture will differ", file=sys.stderr)
    sampler, scheduler = getattr(args, "sampler", None), getattr(args, "scheduler", None)
    if sampler is not None and scheduler is not None:  # both given (unset flags are None here)
        named = schedule_in_name(sampler)
        try:
            asked = schedule_info(scheduler).label
        except InvalidParameter:
            return  # an unknown name: the request's own error says so
        if named is not None and asked not in ("Automatic", named):
            print(f"underpaint: warning: --sampler {sampler!r} names the {named} schedule, which is used instead "
                  f"of --scheduler {scheduler!r} (as in A1111): pass the sampler without it", file=sys.stderr)


def run_img2img(args: argparse.Namespace) -> int:
    from ..imageio.load import load_image

    warn_about_request(args)
    sources = _inputs(args.input)
    batch_mode = len(sources) > 1 or Path(args.input).is_dir()
    # Check every flag against the first image before the (slow) model load.
    first = load_image(sources[0], field="INPUT") if not batch_mode else None
    probe = params_from_args(args, (first,) if first is not None else ())
    _check_upscalers(probe, args)
    plan_outputs(args.output, "img2img", _output_count(probe), overwrite=args.overwrite,
                 source=sources[0] if batch_mode else None)
    engine = _engine_for(args, probe)
    skipped: list[Path] = []
    for source, image in read_inputs(sources, batch_mode, first, skipped=skipped):
        params = params_from_args(args, (image,), model=engine.model)
        _run_and_save(engine, params, args, "img2img", source if batch_mode else None)
    return 1 if skipped else 0


def read_inputs(sources: list[Path], batch_mode: bool, first=None, *, skipped: list[Path] | None = None):
    """(path, picture) for each input (``first``: the first one, already read). In a folder run an
    unreadable picture is skipped with a line on standard error (and added to ``skipped``), and a count
    at the end; the command then exits 1, so that scripts notice."""
    from ..imageio.load import load_image

    failures = 0
    for source in sources:
        try:
            image = first if first is not None and source == sources[0] else load_image(source, field="INPUT")
        except ImageError as exc:
            if not batch_mode:
                raise
            print(f"underpaint: skipping {source}: {exc}", file=sys.stderr)
            failures += 1
            if skipped is not None:
                skipped.append(source)
            continue
        yield source, image
    if failures:
        print(f"underpaint: {failures} of {len(sources)} inputs were skipped", file=sys.stderr)


def run_txt2img(args: argparse.Namespace) -> int:
    warn_about_request(args)
    params = params_from_args(args)
    _check_upscalers(params, args)
    plan_outputs(args.output, "txt2img", _output_count(params), overwrite=args.overwrite, source=None)
    engine = _engine_for(args, params)
    params = params_from_args(args, model=engine.model)
    _run_and_save(engine, params, args, "txt2img", None)
    return 0


def _check_upscalers(params: GenerationParams, args: argparse.Namespace) -> None:
    """An upscaling model that is not in the models folder, refused before the checkpoint loads."""
    from ..pipeline import upscale

    if params.hires is not None and not params.hires.in_latent_space:
        upscale.resolve(models_folder(args), params.hires.upscaler_name, "hires_upscaler", hires=True)
    if params.sd_upscale is not None:
        upscale.resolve(models_folder(args), params.sd_upscale.upscaler, "sd_upscale_upscaler")
    if params.init_images and params.img2img_upscaler not in (None, "None"):
        upscale.resolve(models_folder(args), params.img2img_upscaler, "img2img_upscaler")


def _run_and_save(engine, params: GenerationParams, args: argparse.Namespace, command: str, source: Path | None) -> None:
    """Generate and save. Ctrl-C stops the run at the next step and still saves the pictures of the
    batches that finished, then ends the command as interrupted; a second Ctrl-C stops at once.
    The stopped batch's pictures are its current estimates (A1111's Interrupt button shows and
    saves those); a command-line run leaves them out, as its Ctrl-C means "stop", not "finish now"."""
    from ..imageio.metadata import save_image
    from ..pipeline.records import Cancellation

    cancel = Cancellation()
    with ProgressBar(label=source.name if source else command) as bar, _ctrl_c_interrupts(cancel):
        result = engine.generate(params, progress=bar.update, cancel=cancel)
    finished = result.finished()
    # -o a.png for several pictures names them a-1.png, a-2.png, ... as planned, also when Ctrl-C left fewer
    planned = max(len(finished), _output_count(params)) if result.interrupted else len(finished)
    paths = plan_outputs(args.output, command, planned, overwrite=args.overwrite, source=source,
                         seeds=[result.seeds[i] for i in finished])[:len(finished)]
    for i, path in zip(finished, paths):
        print(save_image(result.images[i], path, infotext=result.infotexts[i], overwrite=args.overwrite))
    if result.interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _ctrl_c_interrupts(cancel) -> Iterator[None]:
    """While the body runs, the first Ctrl-C interrupts ``cancel`` (the engine stops after the step it
    is on) instead of abandoning everything; the second raises KeyboardInterrupt as usual. Outside
    the main thread, or where Ctrl-C is ignored (a background job), nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield
        return

    def on_ctrl_c(signum, frame):
        if cancel.interrupted:
            raise KeyboardInterrupt
        cancel.interrupt()
        print("underpaint: stopping after this step; the finished pictures will be saved "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
