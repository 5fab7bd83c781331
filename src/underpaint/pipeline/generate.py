"""generate(): img2img and txt2img as numbered steps, each a small helper.

txt2img is the same path from pure noise; with hires. fix (pipeline/hires.py) its latents go
on to an img2img pass at the hires size. The semantics follow AUTOMATIC1111 1.10 so that
an infotext written there reproduces here: strength → steps, seeds → noise, uint8 truncation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch

from ..imageio.convert import images_to_tensor, tensor_to_images
from ..imageio.resize import Enlarge, output_size, resize_image
from ..models.device import to_device
from ..models.freeu import request_freeu
from ..models.seamless import seamless
from ..models.tome import request_token_merging
from ..params import GenerationParams, check_hires_size
from ..prompts.comments import without_comments
from ..sampling import noise as noise_mod
from ..sampling.names import sampler_info
from ..sampling.samplers import STOP, prepare_start, run_sampler
from ..sampling.schedules import ModelSchedule, build_sigmas, img2img_sigmas
from ..errors import InvalidParameter, ModelError, ModelNotFound, UnknownName
from ..sampling.flow import flow_sigmas, flow_start, image_seq_len, shift_mu
from . import flux
from . import deepcache
from . import first_block_cache
from . import hires as hires_mod
from .conditioning import encode_prompts, prompt_encoder
from .control import request_control
from .denoise import make_denoiser
from .guidance import UncondSkip
from . import vae_type
from . import refiner as refiner_mod
from . import inpaint
from .infotext import build_infotext
from .networks import ActiveNetworks, models_dir_of, request_networks
from .preview import preview_images
from .records import Cancellation, ModelInfo, Progress, Result


@dataclass(frozen=True)
class Plan:
    """What a request resolves to before any tensor work: size, seeds, sigmas."""

    params: GenerationParams
    width: int
    height: int
    sigmas: torch.Tensor
    #: The uncut schedule the cut was taken from: SDE samplers span their Brownian trees over it.
    full_sigmas: torch.Tensor
    steps_run: int
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    #: The prepared mask, crop and pictures when inpainting.
    inpaint: inpaint.InpaintJob | None = None
    #: The request's "Upscaler for img2img" (:func:`_enlarger`); None: Lanczos.
    enlarge: Enlarge | None = None


@dataclass(frozen=True)
class HiresPlan:
    """The second pass of a hires. fix request: an img2img plan at the hires size."""

    plan: Plan
    size: hires_mod.HiresSize
    #: The picture upscaler, resolved before the first pass (pipeline/upscale.py ``resolve``: a
    #: built-in's name or a model's entry); None for the latent modes.
    upscaler: object


@dataclass(frozen=True)
class SecondPassStart:
    """What the second pass starts from instead of an init picture."""

    init: torch.Tensor  # the upscaled, cropped first-pass latents
    pixels: torch.Tensor | None  # the upscaled pictures in [-1, 1] (picture upscalers), for inpainting models
    first_evaluations: int  # the first pass's model evaluations: prompt editing counts on from there
    cond_size: tuple[int, int]  # SDXL's size conditioning: the upscale size, as A1111 (hr_upscale_to_x/y)


def generate(model, params: GenerationParams, *, info: ModelInfo, progress, cancel: Cancellation,
             refiner=None, hires_model=None, load: Callable | None = None) -> Result:
    """Run ``n_iter`` batches of ``batch_size`` images; batch image i uses seed + i. ``refiner`` and
    ``hires_model``: the loaded checkpoints ``params.refiner`` and ``params.hires.checkpoint`` name
    (``Engine.generate`` loads them); ``load(name)``: loads another one (an X/Y/Z plot's cells may
    name their own refiner)."""
    if params.xyz_plot is not None:  # A1111's "X/Y/Z plot" script: each cell one request of its own
        from . import xyz_plot

        def cell(cell, report) -> Result:
            own = cell.params.refiner  # a "Refiner checkpoint" axis gives each cell its own (loaded once, kept)
            cell_refiner = load(own.checkpoint) if own is not None and load is not None else refiner
            return generate(model, cell.params, info=info, progress=report, cancel=cancel, refiner=cell_refiner,
                            hires_model=hires_model, load=load)

        # One model here: the Checkpoint name and VAE axes are refused (the server and the CLI switch models).
        return xyz_plot.run(cell, params, info=info, progress=progress, cancel=cancel)
    if params.prompt_matrix is not None or params.prompts_from_file is not None:
        # A1111's "Prompt matrix" and "Prompts from file or textbox": each picture or line a request of its own
        from . import prompt_matrix, prompts_file

        def one(request, report) -> Result:
            request = getattr(request, "params", request)  # a line's Job, or a combination's request
            return generate(model, request, info=info, progress=report, cancel=cancel, refiner=refiner,
                            hires_model=hires_model, load=load)

        script = prompt_matrix if params.prompt_matrix is not None else prompts_file
        return script.run(one, params, info=info, progress=progress, cancel=cancel)
    params = without_comments(params)  # before anything reads the prompts (a script's cells get here too)
    params, detailer_models = _detailer_checkpoints(params, load)
    refiner = _second_model(model, refiner, params, params.refiner and params.refiner.checkpoint,
                            "refiner_checkpoint", refiner_mod.check)
    hires_model = _second_model(model, hires_model, params, params.hires and params.hires.checkpoint,
                                "hires_checkpoint", hires_mod.check_checkpoint)
    if flux.is_flux(model):
        _check_flux_request(params)
        params = _without_token_merging(params)
    # 0. Extra networks: the prompt's LoRAs are merged into the weights for this request only.
    encoder = None if flux.is_flux(model) else prompt_encoder(model, params.clip_skip)
    with request_networks(model, params, encoder=encoder, others=(refiner, hires_model)) as networks, \
            seamless(model, params.tiling), \
            seamless(refiner, params.tiling and refiner is not None), \
            seamless(hires_model, params.tiling and hires_model is not None):
        if params.loopback is not None:  # A1111's "Loopback" script: img2img on its own result, again and again
            from . import loopback

            return loopback.run(
                _with_interrogator(params.with_seed(), model),
                lambda pass_params, report: _generate(model, pass_params, networks, info=info, progress=report,
                                                      cancel=cancel, refiner=refiner, detailer_models=detailer_models),
                info=info, progress=progress, cancel=cancel)
        if params.sd_upscale is not None:  # A1111's "SD upscale" script: img2img tile by tile
            from . import sd_upscale

            return sd_upscale.run(
                params.with_seed(),
                lambda tile_params, report: _generate(model, tile_params, networks, info=info, progress=report,
                                                      cancel=cancel, refiner=refiner, detailer_models=detailer_models),
                info=info, folder=getattr(model, "models_dir", None), device=str(model.device), progress=progress,
                cancel=cancel)
        return _generate(model, params, networks, info=info, progress=progress, cancel=cancel, refiner=refiner,
                         hires_model=hires_model, detailer_models=detailer_models)


def _detailer_checkpoints(params: GenerationParams, load: Callable | None) -> tuple[GenerationParams, dict]:
    """The checkpoints ADetailer tabs name for their passes, loaded by ``load`` (the engine's loader of a
    second checkpoint) before any work, by the name the tab gives; the tabs then record the loaded
    checkpoints' titles. A name with no ``load`` (a bare pipeline call) is refused naming the tab's field."""
    named = [(n, unit) for n, unit in enumerate(params.detailer) if unit.checkpoint is not None]
    if not named:
        return params, {}
    models: dict = {}
    for n, unit in named:
        if load is None:
            raise InvalidParameter(f"detailer[{n}].checkpoint", unit.checkpoint,
                                   "the request's own checkpoint (a separate one is loaded by the engine)")
        if unit.checkpoint not in models:
            try:
                models[unit.checkpoint] = load(unit.checkpoint)
            except UnknownName as exc:
                raise UnknownName(f"detailer[{n}].checkpoint", exc.value, exc.choices) from None
            except ModelNotFound as exc:
                field = f"detailer[{n}].checkpoint"
                raise ModelNotFound(f"{field}: {exc.message}", field=field) from None
    units = tuple(replace(unit, checkpoint_title=models[unit.checkpoint].short_title) if unit.checkpoint else unit
                  for unit in params.detailer)
    return params.replace(detailer=units), models


def _with_interrogator(params: GenerationParams, model) -> GenerationParams:
    """A Loopback request that appends Interrogate CLIP's reading or DeepBooru's tags, given the reader
    on the model's models folder (A1111's default settings) when it names none; the files not there are
    refused naming the field."""
    options = params.loopback
    if options.interrogate == "None" or options.interrogator is not None:
        return params
    from functools import partial

    from ..errors import ModelNotFound

    folder, device = models_dir_of(model), str(model.device)
    try:
        if options.interrogate == "DeepBooru":
            from ..models import deepbooru as db

            reader = partial(db.deepbooru, path=db.tagger_file(folder), device=device)
        else:
            from ..models import interrogate as it

            reader = partial(it.interrogate, files=it.interrogate_files(folder), device=device)
    except ModelNotFound as exc:
        what = "DeepBooru's tagger" if options.interrogate == "DeepBooru" else "Interrogate CLIP's files"
        raise InvalidParameter("loopback_interrogate", options.interrogate,
                               f"None, or a models folder with {what} ({exc.message})") from None
    return params.replace(loopback=replace(options, interrogator=reader))


def _second_model(model, loaded, params: GenerationParams, name: str | None, field: str, check: Callable):
    """The other checkpoint a request names (``name``: its refiner or hires checkpoint), as ``Engine.generate``
    loaded it, checked against the model; None when the request names none."""
    if name is None:
        return None
    if loaded is None:
        raise InvalidParameter(field, name, "a checkpoint loaded by Engine.generate (generate() was called without it)")
    check(model, loaded, params)
    return loaded


def _check_flux_request(params: GenerationParams) -> None:
    """What FLUX does not do yet, refused up front with the field that asks for it."""
    from ..sampling.flow import check_flow_sampler

    check_flow_sampler(params.sampler)
    if params.freeu is not None:
        raise InvalidParameter("freeu", "on", "off for a FLUX model (FreeU works on a UNet's decoder; FLUX has a "
                               "transformer)")
    if params.tiling:
        raise InvalidParameter("tiling", True, "false for a FLUX model (its transformer has no convolutions to wrap "
                               "around the picture's edges)")
    if params.deepcache is not None and params.deepcache.interval > 1:
        raise InvalidParameter("deepcache_interval", params.deepcache.interval,
                               "1 (off) for a FLUX model (DeepCache splits SD/SDXL UNets; FLUX has first_block_cache)")
    if params.hires is not None and params.control_units:
        raise InvalidParameter("hires", "with ControlNet units",
                               "no ControlNet units with a FLUX model (hires. fix with FLUX ControlNets is not "
                               "available yet)")
    if params.hires is not None and params.hires.sampler is not None:
        try:
            check_flow_sampler(params.hires.sampler)
        except InvalidParameter as exc:
            raise InvalidParameter("hires_sampler", exc.value, exc.expected) from None


def _without_token_merging(params: GenerationParams) -> GenerationParams:
    """FLUX has no UNet to merge tokens in (models/tome.py): the ratios are dropped, so the
    infotext records none."""
    if not params.token_merging_ratio and not (params.hires and params.hires.token_merging_ratio):
        return params
    hires = replace(params.hires, token_merging_ratio=0.0) if params.hires is not None else None
    return params.replace(token_merging_ratio=0.0, hires=hires)


def _generate(model, params: GenerationParams, networks: ActiveNetworks, *, info: ModelInfo, progress,
              cancel: Cancellation, refiner=None, hires_model=None, detailer_models=None) -> Result:
    # 1. Check inputs and fix the random seeds so they can be recorded.
    params = params.with_seed()
    plan = _plan(model, params)
    hires = _hires_plan(model, plan) if params.hires is not None else None
    if not flux.is_flux(model):
        deepcache.for_request(model, params.deepcache)  # a branch this UNet lacks is refused before any work

    # 2. strength 0 keeps the picture: return the input as it is (resized only if asked).
    if params.is_img2img and params.strength == 0:
        return _identity_result(plan, info)
    _check_size_from_picture(plan)

    # 2b. A mask: crop, masks and masked content (inpaint.py); an empty mask keeps the picture.
    if params.mask is not None:
        job = inpaint.prepare_inpaint(params, plan.width, plan.height, enlarge=plan.enlarge)
        if job is None:
            return _identity_result(plan, info)
        plan = replace(plan, inpaint=job)
    plan = _with_inpaint_infotext(model, plan)
    if flux.is_flux(model):
        plan = replace(plan, params=flux.with_infotext(model, plan.params))

    # 2c. ControlNet units: load their nets, make their maps, record them in the infotext. An
    #     inpaint unit masks with the prepared (inverted, blurred) mask, as A1111's ControlNet does.
    crop, control_params = None, params
    if plan.inpaint is not None:
        control_params = params.replace(mask=plan.inpaint.picture_mask)
        if plan.inpaint.crop is not None:
            crop = (plan.inpaint.crop, plan.inpaint.output_size)
    if flux.is_flux(model):
        from . import flux_control

        control = flux_control.prepare(model, control_params, width=plan.width, height=plan.height,
                                       steps=plan.steps_run, encode=lambda pixels: encode_pixels(model, pixels),
                                       crop=crop)
    else:
        control = request_control(model, control_params, width=plan.width, height=plan.height, steps=plan.steps_run,
                                  crop=crop)
    if control is not None:
        plan = replace(plan, params=control.with_infotext(plan.params))
    first_block_cache.for_request(model, params.first_block_cache, control=control)  # refused before any work
    vae_type.check(model, params)  # a TAESD file that is not there: refused before any work
    restoring = ["restore_faces"] * params.restore_faces + [
        f"detailer[{n}].restore_face" for n, unit in enumerate(params.detailer) if unit.restore_face]
    if restoring:  # so are face restoration's missing files (the request's, or an ADetailer tab's)
        from .face_restore import face_model_files

        face_model_files(models_dir_of(model), restoring[0], params.face_restoration_model)
    # 2d. LoRA and embedding hashes, after the inpaint and ControlNet keys as A1111 orders them.
    plan = replace(plan, params=networks.with_infotext(plan.params))
    if refiner is not None:  # A1111 records the refiner when the switch comes, while sampling
        entries = refiner_mod.infotext_for_plan(refiner, params.refiner, model_schedule(model).sigmas, plan.sigmas,
                                                None if hires is None else hires.plan.sigmas)
        plan = replace(plan, params=plan.params.replace(extra_infotext=plan.params.extra_infotext + entries))
    detail = _detailer(model, params, plan, networks, info, cancel, detailer_models)  # ADetailer: faces again
    if detail is not None:
        from . import detailer

        entries = detailer.infotext_entries(params.detailer)
        plan = replace(plan, params=plan.params.replace(extra_infotext=plan.params.extra_infotext + entries))

    images, infotexts, seeds, subseeds, unfinished = [], [], [], [], []
    interrupted = False
    for job in range(params.n_iter):
        if cancel.interrupted:
            interrupted = True
            break
        lo = job * params.batch_size
        batch_seeds = plan.seeds[lo : lo + params.batch_size]
        batch_subseeds = plan.subseeds[lo : lo + params.batch_size]
        if hires is None:
            batch = _run_batch(model, plan, job, batch_seeds, batch_subseeds, progress, cancel,
                               getattr(control, "stack", control), refiner=refiner)
        else:
            batch = _run_hires_batch(model, plan, hires, job, batch_seeds, batch_subseeds, progress, cancel,
                                     getattr(control, "stack", None), second_model=hires_model, refiner=refiner)
        if cancel.batch_was_stopped():  # stopped before its last step: its current estimate
            unfinished.extend(range(len(images), len(images) + len(batch)))
        elif detail is not None:
            batch = [detail(image, seed, subseed) for image, seed, subseed in zip(batch, batch_seeds, batch_subseeds)]
        cancel.clear_skip()
        images.extend(batch)
        seeds.extend(batch_seeds)
        subseeds.extend(batch_subseeds)
        for seed, subseed in zip(batch_seeds, batch_subseeds):
            infotexts.append(build_infotext(plan.params, info, width=plan.width, height=plan.height, seed=seed, subseed=subseed))
        if cancel.interrupted:
            interrupted = True
            break
    n = len(images)
    return Result(
        images=tuple(images),
        infotexts=tuple(infotexts),
        seeds=tuple(seeds),
        subseeds=tuple(subseeds),
        params=params,
        model=info,
        interrupted=interrupted,
        prompts=(params.prompt,) * n,
        negative_prompts=(params.negative_prompt,) * n,
        unfinished=tuple(unfinished),
    )


def _detailer(model, params: GenerationParams, plan: Plan, networks, info: ModelInfo, cancel: Cancellation,
              others: dict | None = None):
    """``detail(picture, seed, subseed)`` for a request with ADetailer tabs (pipeline/detailer.py), each
    face an inpainting request of its own on this model, or on the checkpoint its tab names (``others``:
    those loaded, by name; the request's LoRAs then apply to it as to any request); None without tabs.
    Checked before any work: the tabs' models and the face detector's file."""
    if not params.detailer:
        return None
    from . import detailer

    folder = models_dir_of(model)
    finders = {}
    for n, unit in enumerate(params.detailer):
        if unit.controlnet_model not in (None, "Passthrough"):  # its file, before any work
            from ..models.controlnet import resolve_controlnet
            from .control import control_resources

            try:
                resolve_controlnet(unit.controlnet_model, control_resources(model)[1], kind=None,
                                   family=model.spec.family)
            except UnknownName as exc:
                raise UnknownName(f"detailer[{n}].controlnet_model", exc.value, exc.choices) from None
            except ModelError as exc:
                raise ModelNotFound(exc.message, field=f"detailer[{n}].controlnet_model") from None
        if (unit.model, unit.model_classes) not in finders:
            finders[unit.model, unit.model_classes] = detailer.finder(
                folder, model.device, unit.model, field=f"detailer[{n}].model", classes=unit.model_classes)

    def find(unit, picture):
        return finders[unit.model, unit.model_classes](picture, unit.confidence)

    vaes = _tab_vaes(model, params, others or {})
    saved: dict[int, tuple] = {}  # a model whose VAE a tab changed: (model, its own tensors, the VAE in use)

    def use_vae(target, unit) -> None:
        """``target`` runs with the tab's VAE (its own again for a tab naming none), changed only when needed."""
        from ..models.vae_swap import copy_into, restore, snapshot

        wanted = (id(target), unit.vae) if unit.vae is not None else None
        current = saved[id(target)][2] if id(target) in saved else None
        if wanted == current:
            return
        if id(target) not in saved:
            saved[id(target)] = (target, snapshot(target.vae), None)
        if wanted is None:
            restore(target.vae, saved[id(target)][1])
        else:
            copy_into(target.vae, vaes[wanted])
        saved[id(target)] = (*saved[id(target)][:2], wanted)

    def inpaint(request: GenerationParams, unit):
        other = unit.checkpoint is not None and others and unit.checkpoint in others
        use_vae(others[unit.checkpoint] if other else model, unit)
        if other:
            done = generate(others[unit.checkpoint], request, info=info, progress=None, cancel=cancel)
        else:
            done = _generate(model, request, networks, info=info, progress=None, cancel=cancel)
        return done.images[0] if done.images and not done.unfinished else request.init_images[0]

    def detail(picture, seed: int, subseed: int):
        from ..models.vae_swap import restore

        try:
            return detailer.detail(picture, seed, subseed, params, find, inpaint, size=(plan.width, plan.height),
                                   interrupted=lambda: cancel.interrupted)
        finally:  # every VAE a tab changed is the model's own again
            for target, own, current in saved.values():
                if current is not None:
                    restore(target.vae, own)
            saved.clear()

    return detail


def _tab_vaes(model, params: GenerationParams, others: dict) -> dict:
    """The VAEs ADetailer tabs name, by (the model the tab runs on, the name): each built and checked
    against that model's running VAE before any work (refused naming the tab's field where it does
    not fit); "None" is the checkpoint's own."""
    from ..models.loader import load_own_vae, load_vae
    from ..models.vae_swap import mismatch

    found: dict = {}
    for n, unit in enumerate(params.detailer):
        if unit.vae is None:
            continue
        target = others.get(unit.checkpoint, model) if unit.checkpoint else model
        key, field = (id(target), unit.vae), f"detailer[{n}].vae"
        if key in found:
            continue
        if unit.vae == "None":
            new = load_own_vae(target.path, target.spec, device="cpu", dtype=target.dtype)
            if new is None:
                raise InvalidParameter(field, unit.vae, "a VAE file (this checkpoint's own VAE cannot be read alone)")
        else:
            try:
                path = models_dir_of(target).resolve_vae(unit.vae)
            except UnknownName as exc:
                raise UnknownName(field, exc.value, exc.choices) from None
            except ModelNotFound as exc:
                raise ModelNotFound(f"{field}: {exc.message}", field=field) from None
            new = load_vae(path, target.spec, device="cpu", dtype=target.dtype)
        problem = mismatch(target.vae, new)
        if problem is not None:
            raise InvalidParameter(field, unit.vae, f"a VAE that fits the checkpoint's ({problem})")
        found[key] = new
    return found


def _plan(model, params: GenerationParams) -> Plan:
    """Output size, per-image seeds and the sigma list (cut by strength for img2img)."""
    if params.is_img2img:
        width, height = output_size(params.init_images[0].size, params.width, params.height)
    else:
        requested_w, requested_h = requested_size(model, params)
        width, height = requested_w // 8 * 8, requested_h // 8 * 8
    if flux.is_flux(model):
        width, height = width // 16 * 16, height // 16 * 16  # whole 2×2 patches of the latent
        if width < 16 or height < 16:
            raise InvalidParameter("width" if width < 16 else "height", width if width < 16 else height,
                                   "at least 16 pixels for a FLUX model")
    sigmas, full = _schedule(model, params, width, height, img2img=params.is_img2img)
    total = params.batch_size * params.n_iter
    seeds = tuple((params.seed + i) % 2**64 for i in range(total))
    subseeds = tuple((params.subseed + i) % 2**64 for i in range(total))
    return Plan(params, width, height, sigmas, full, len(sigmas) - 1, seeds, subseeds, enlarge=_enlarger(model, params))


def _enlarger(model, params: GenerationParams) -> Enlarge | None:
    """The request's "Upscaler for img2img" as a resize step (an unknown name is refused here,
    before any work); None for txt2img and for "None"."""
    name = params.img2img_upscaler
    if not params.init_images or name is None or name.strip().lower() == "none":
        return None
    from . import upscale

    upscaler = upscale.resolve(getattr(model, "models_dir", None), name, "img2img_upscaler")
    return upscale.enlarger(upscale.picture_pass(upscaler, device=str(model.device)))


def _check_size_from_picture(plan: Plan) -> None:
    """An output size taken from a tiny picture, 8x8 pixels (one latent cell), leaves the VAE's group
    norms a single value to normalise, which fails deep inside torch: refused here instead, naming
    the picture. Sizes asked for are checked as fields (64 and up)."""
    if plan.params.is_img2img and plan.width <= 8 and plan.height <= 8:
        iw, ih = plan.params.init_images[0].size
        raise InvalidParameter("init_images", f"{iw}x{ih} picture",
                               f"a picture larger than {plan.width}x{plan.height} pixels once rounded down to "
                               f"multiples of 8 (a single latent cell cannot be painted): set width and height, "
                               f"or use a larger picture")


def requested_size(model, params: GenerationParams) -> tuple[int, int]:
    """txt2img's size as asked (the family's default where none is given), before rounding."""
    default = 1024 if model.spec.family.value in ("sdxl", "sdxl_refiner", "flux") else 512
    return params.width or default, params.height or default


def _hires_plan(model, plan: Plan) -> HiresPlan:
    """The hires pass: its size from the first pass's requested size (as A1111 works it out),
    its sigmas as img2img with fixed steps, the same seeds."""
    p = plan.params
    assert p.hires is not None
    width, height = requested_size(model, p)
    multiple = 16 if flux.is_flux(model) else 8
    check_hires_size(p.hires, width, height, multiple=multiple)
    size = hires_mod.hires_size(p.hires, width, height, multiple=multiple)
    second = hires_mod.second_pass_params(p, size)
    try:
        sigmas, full = _schedule(model, second, size.width, size.height, img2img=True, fixed=True)
    except InvalidParameter as exc:  # the second pass's own sampler or schedule
        if exc.field not in ("sampler", "scheduler"):
            raise
        raise InvalidParameter(f"hires_{exc.field}", exc.value, exc.expected) from None
    upscaler = None
    if not p.hires.in_latent_space:  # an unknown upscaling model is refused before any work
        from . import upscale

        upscaler = upscale.resolve(getattr(model, "models_dir", None), p.hires.upscaler_name, "hires_upscaler",
                                   hires=True)
    return HiresPlan(replace(plan, params=second, width=size.width, height=size.height, sigmas=sigmas,
                             full_sigmas=full, steps_run=len(sigmas) - 1), size, upscaler)


def _schedule(model, params: GenerationParams, width: int, height: int, *, img2img: bool,
              fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmas to run and the uncut schedule they come from; img2img cuts by strength
    (``fixed``: always through that rule, as a hires pass at strength 1 too)."""
    built: list[torch.Tensor] = []

    def full(n: int) -> torch.Tensor:
        if flux.is_flux(model):
            built.append(flux_schedule(model, params, n, width, height))
        else:
            built.append(build_sigmas(params.sampler, params.scheduler, n, model_schedule(model),
                                      params.sampler_options, family=model.spec.family.value))
        return built[-1]

    if img2img and (params.strength < 1 or fixed):
        timestep = "timestep" in sampler_info(params.sampler).flags
        sigmas = img2img_sigmas(full, params.steps, params.strength, params.fix_steps, count_from_end=timestep)
    else:
        sigmas = full(params.steps)
    return sigmas, built[-1]


def flux_schedule(model, params: GenerationParams, steps: int, width: int, height: int) -> torch.Tensor:
    """A flow model's σ list: shifted by the picture size for guidance-distilled FLUX.1-dev (and
    Fill), unshifted for schnell, as the reference code samples them."""
    shifted = bool(getattr(model.unet.config, "guidance_embeds", False))
    mu = shift_mu(image_seq_len(width, height)) if shifted else None
    options = params.sampler_options
    return flow_sigmas(steps, mu=mu, schedule=params.scheduler, sampler=params.sampler, rho=options.rho,
                       beta_shape=(options.beta_alpha, options.beta_beta))


def model_schedule(model) -> ModelSchedule:
    """The discrete sigmas of the model's training schedule (cached on the model)."""
    cached = getattr(model, "_schedule", None)
    if cached is None:
        cached = ModelSchedule.from_alphas_cumprod(model.alphas_cumprod)
        try:
            model._schedule = cached
        except AttributeError:
            pass
    return cached


def _identity_result(plan: Plan, info: ModelInfo) -> Result:
    p = plan.params
    total = p.batch_size * p.n_iter
    asked = p.width is not None or p.height is not None
    base = [resize_image(img, plan.width, plan.height, p.resize_mode, enlarge=plan.enlarge) if asked else img.copy()
            for img in p.init_images]
    images = tuple(base[i % len(base)] for i in range(total))
    width, height = images[0].size
    infotexts = tuple(build_infotext(p, info, width=width, height=height, seed=s, subseed=u)
                      for s, u in zip(plan.seeds, plan.subseeds))
    return Result(images, infotexts, plan.seeds, plan.subseeds, p, info,
                  prompts=(p.prompt,) * total, negative_prompts=(p.negative_prompt,) * total)


def _run_hires_batch(model, plan: Plan, hires: HiresPlan, job: int, seeds, subseeds, progress,
                     cancel: Cancellation, control=None, *, second_model=None, refiner=None):
    """One batch of a hires. fix request: the first pass, the upscale, the second pass.

    Progress counts the steps of both passes. An interrupt or a skip during the first pass returns
    its current estimate at the first size, without the second pass (A1111 skips it then too).
    ``control`` (a ControlStack) runs in both passes, the second with its own maps and steps; each
    pass leaves out the units whose hires-fix option is the other pass only. ``second_model``: A1111's
    Hires checkpoint, which encodes the upscaled picture, samples the second pass and decodes it;
    ``refiner``: A1111's Refiner, in the passes its ``hires_pass`` names (by default the second only);
    each pass starts on its own model.
    """
    total = plan.steps_run + hires.plan.steps_run
    first = None if control is None else control.first_pass()
    in_first = refiner is not None and plan.params.refiner.in_pass(second=False)
    latents = _run_batch(model, plan, job, seeds, subseeds, progress, cancel, first, keep_latents=True,
                         window=(0, total), refiner=refiner if in_first else None)
    if cancel.interrupted or cancel.skipped:
        cancel.stop_batch()  # even when the first pass had finished: the picture lacks the second
        return decode_latents(model, latents, plan.params.vae_decode_method)
    try:
        start = _second_pass_start(model, plan, hires, latents, cancel, encoder=second_model)
    except _UpscaleStopped:  # interrupted or skipped while an upscaling model ran
        cancel.stop_batch()
        return decode_latents(model, latents, plan.params.vae_decode_method)
    second = None
    if control is not None:
        second = control.second_pass(hires.plan.width, hires.plan.height, hires.plan.steps_run)
    in_second = refiner is not None and plan.params.refiner.in_pass(second=True)
    return _run_batch(second_model or model, hires.plan, job, seeds, subseeds, progress, cancel, second, start=start,
                      window=(plan.steps_run, total), refiner=refiner if in_second else None)


class _UpscaleStopped(Exception):
    """An interrupt or skip between an upscaling model's tiles."""


def _second_pass_start(model, plan: Plan, hires: HiresPlan, latents: torch.Tensor,
                       cancel: Cancellation | None = None, *, encoder=None) -> SecondPassStart:
    """Upscale the first pass: in latent space, or decoded, upscaled (Pillow or an upscaling model)
    and encoded again (by ``encoder``'s VAE when given: a Hires checkpoint's); then crop to the hires size."""
    p = plan.params
    assert p.hires is not None
    size, upscaler = hires.size, p.hires.upscaler_name
    pixels = None
    if p.hires.in_latent_space:
        init = hires_mod.upscale_latents(latents, upscaler, size.upscale_width, size.upscale_height)
    else:
        from .upscale import picture_pass

        def check() -> None:
            if cancel is not None and (cancel.interrupted or cancel.skipped):
                raise _UpscaleStopped

        one_pass = picture_pass(hires.upscaler, device=str(model.device), cancel=check)
        pictures = [hires_mod.upscale_picture(image, size.upscale_width, size.upscale_height, upscaler, one_pass)
                    for image in decode_latents(model, latents, p.vae_decode_method)]
        pixels = images_to_tensor(pictures)
        init = encode_pixels(encoder or model, pixels, p.vae_encode_method)
    init = hires_mod.crop_latents(init, size)
    if pixels is not None:
        top, left = size.crop_y // 2 * 8, size.crop_x // 2 * 8
        pixels = pixels[..., top : top + size.height, left : left + size.width]
    return SecondPassStart(init.to(torch.float32), pixels, model_evaluations(p),
                           (size.upscale_width, size.upscale_height))


def model_evaluations(p: GenerationParams) -> int:
    """The model evaluations ``p.steps`` make (second-order samplers: two a step); prompt editing
    is scheduled over these, as A1111 does."""
    return p.steps * (2 if "second_order" in sampler_info(p.sampler).flags else 1)


def _run_batch(model, plan: Plan, job: int, seeds, subseeds, progress, cancel: Cancellation, control=None, *,
               start: SecondPassStart | None = None, keep_latents: bool = False,
               window: tuple[int, int] | None = None, refiner=None):
    """One batch: encode prompts, make the start latent, sample, decode.

    ``start`` makes it a hires. fix second pass from those latents; ``keep_latents`` returns the
    latents undecoded; ``window`` is (steps before, steps in all) for progress across passes.
    """
    p = plan.params
    device = model.device
    b = len(seeds)
    latent_shape = (model.spec.latent_channels, plan.height // 8, plan.width // 8)
    is_flux = flux.is_flux(model)

    # 3. Encode the prompts (prompt-editing schedules become per-step conditioning).
    #    In the medium and low memory modes the text encoders visit the device for this only.
    from ..models.offload import on_device

    evaluations = model_evaluations(p)
    # A hires pass schedules prompt editing past the first pass's evaluations (A1111's hires_steps).
    steps, hires_steps = (evaluations, None) if start is None else (start.first_evaluations, evaluations)
    cond_w, cond_h = (plan.width, plan.height) if start is None else start.cond_size
    with on_device(model, "text"):
        if is_flux:
            conds = flux.encode_prompts(model, p, steps, batch=b, hires_steps=hires_steps)
        else:
            conds = encode_prompts(model, p, steps, batch=b, width=cond_w, height=cond_h, hires_steps=hires_steps)

    # 4. Prepare the start latent: VAE-encoded picture plus noise at the first sigma.
    noise = noise_mod.image_noise(
        seeds, latent_shape, rng=p.rng, device=device,
        subseeds=subseeds if p.subseed_strength > 0 else None, subseed_strength=p.subseed_strength,
        seed_resize_from=(p.seed_resize_from_w, p.seed_resize_from_h),
    ).to(torch.float32)
    if p.noise_multiplier != 1.0 and p.is_img2img and start is None:  # A1111's "Noise multiplier for img2img"
        noise = noise * p.noise_multiplier
    encode = lambda pixels: encode_pixels(model, pixels, p.vae_encode_method)  # noqa: E731
    masked = None if plan.inpaint is None else inpaint.job_latents(
        plan.inpaint, encode, batch=b, noise=_content_noise(p, seeds, latent_shape, device))
    init = None
    if start is not None:
        init = start.init.to(device)
    elif p.is_img2img and p.strength < 1:
        init = masked.init if masked is not None else encode_images(model, p.init_images, plan, b)
    if is_flux:
        sigmas = to_device(plan.sigmas, device)
        x = flow_start(noise, sigmas, init)
        if init is not None and p.extra_noise:  # as Forge adds it on the flow path
            x = x + noise * p.extra_noise
    else:
        x, sigmas = prepare_start(p.sampler, noise, to_device(plan.sigmas, device), init=init,
                                  model_schedule=model_schedule(model), extra_noise=p.extra_noise if init is not None else 0.0,
                                  sgm=p.sgm_noise_multiplier)

    # 5. Denoiser: model wrapper ∘ CFG ∘ inpaint blend (∘ ControlNet); a 9-channel
    #    inpainting checkpoint also sees the mask and the masked picture.
    pixels = None if start is None else start.pixels
    # A1111's NGMS and Skip Early CFG: which evaluations run the prompt alone.
    skip = UncondSkip.of(p, steps=len(plan.sigmas) - 1)
    if is_flux:
        extra = flux_fill_channels(model, plan, b, encode, pixels=pixels) if model.spec.is_inpaint else None
        if control is not None:
            control.on_step(0)
        denoiser = flux.make_denoiser(model, conds, p, extra_channels=extra, control=control, skip=skip)
    else:
        extra = _inpaint_channels(model, plan, b, encode, pixels=pixels) if model.spec.is_inpaint else None
        if model.spec.is_edit:  # InstructPix2Pix: the picture to edit, beside the latent
            extra = _edit_channels(model, plan, b)
        if control is not None:
            control.on_step(0)
        denoiser = make_denoiser(model, conds, p.cfg_scale, model_schedule(model), p.sampler,
                                 image_conditioning=extra, control=control, skip=skip,
                                 image_cfg_scale=p.image_cfg_scale if model.spec.is_edit else None)
        if refiner is not None:
            denoiser = _with_refiner(model, refiner, denoiser, conds, p, steps=steps, batch=b, size=(cond_w, cond_h),
                                     hires_steps=hires_steps, skip=skip)
    if masked is not None:
        denoiser = masked.wrap(denoiser, sigmas)
    info = sampler_info(p.sampler)
    noise_sampler = _noise_sampler(info, x, to_device(plan.full_sigmas, device), seeds, p, device)

    # 6. Denoising loop, with the request's speed/quality trade-offs for this loop only.
    callback = _callback(model, plan, job, progress, cancel, control, window=window)
    with torch.inference_mode(), _tradeoffs(model, p, denoiser, callback, control=control) as (denoiser, callback):
        latents = run_sampler(p.sampler, denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback,
                              options=p.sampler_options, model_schedule=None if is_flux else model_schedule(model))
    if keep_latents:
        return latents

    # 7. Decode to pixels with A1111's uint8 truncation; inpainting pastes the result back
    #    and lays the original pixels over everything outside the mask.
    if masked is None:
        return _finished(model, decode_latents(model, latents, p.vae_decode_method), plan, cancel)
    images = _finished(model, decode_latents(model, masked.finish(latents), p.vae_decode_method), plan, cancel)
    return [inpaint.composite(image, plan.inpaint, i) for i, image in enumerate(images)]


def _finished(model, images: list, plan: Plan, cancel: Cancellation) -> list:
    """The decoded pictures as A1111 finishes them before any overlay: faces restored, then colours corrected."""
    if plan.params.restore_faces:
        from .face_restore import restore_pictures

        images = restore_pictures(model, models_dir_of(model), images, plan.params, lambda: cancel.interrupted)
    return _colour_corrected(images, plan)


def _with_refiner(model, refiner, base, conds, p: GenerationParams, *, steps: int, batch: int, size: tuple[int, int],
                  hires_steps, skip):
    """The base denoiser until A1111's refiner switch, then one for the refiner: its own prompt encoding
    (made at the switch, prompt editing counted on from the base's evaluations) and noise schedule."""
    from ..models.offload import on_device

    def make() -> Callable:
        with on_device(refiner, "text"):
            refined = encode_prompts(refiner, p, steps, batch=batch, width=size[0], height=size[1],
                                     hires_steps=hires_steps)
        refined.step = conds.step
        return make_denoiser(refiner, refined, p.cfg_scale, model_schedule(refiner), p.sampler, skip=skip)

    return refiner_mod.SwitchingDenoiser(base, make, model_schedule(model).sigmas, p.refiner.switch_at)


def _colour_corrected(images: list, plan: Plan) -> list:
    """A1111's img2img colour correction (pipeline/color_correction.py) when the request asks for it:
    image i matched to reference i mod n, the init pictures as this pass prepared them (inpainting:
    cropped, masked content painted in), or the request's ``color_reference``."""
    p = plan.params
    if not p.img2img_color_correction or not p.is_img2img:
        return images
    from . import color_correction

    if p.color_reference is not None:
        references = [p.color_reference]
    elif plan.inpaint is not None:
        references = list(plan.inpaint.sources)
    else:
        references = resized_inits(p.init_images, plan)
    labs = [color_correction.lab_of(ref) for ref in references]
    return [color_correction.correct(image, labs[i % len(labs)]) for i, image in enumerate(images)]


def _with_inpaint_infotext(model, plan: Plan) -> Plan:
    """Add A1111's inpaint keys (Mask blur, Masked content, ..., Conditional mask weight)."""
    p = plan.params
    if p.mask is None and not model.spec.is_inpaint:
        return plan
    entries = inpaint.inpaint_infotext(p.inpaint, cropped=plan.inpaint is not None and plan.inpaint.crop is not None,
                                       conditioning=model.spec.is_inpaint, masked=plan.inpaint is not None)
    return replace(plan, params=p.replace(extra_infotext=p.extra_infotext + entries))


@contextmanager
def _tradeoffs(model, p: GenerationParams, denoiser, callback, *, control=None) -> Iterator[tuple[Callable, Callable]]:
    """The request's opt-in speed/quality trade-offs around one sampling loop (a hires pass has its
    own): token merging and DeepCache on SD/SDXL UNets, First Block Cache on FLUX. Yields the
    denoiser and step callback to sample with (DeepCache counts steps through the callback)."""
    with ExitStack() as stack:
        stack.enter_context(request_token_merging(model, p.token_merging_ratio))
        if flux.is_flux(model):
            fbc = first_block_cache.for_request(model, p.first_block_cache, control=control)
            if fbc is not None:
                denoiser = fbc.wrap_denoiser(denoiser)
                stack.enter_context(fbc.installed())
        else:
            stack.enter_context(request_freeu(model, p.freeu))
            cache = deepcache.for_request(model, p.deepcache)
            if cache is not None:
                denoiser, callback = cache.wrap_denoiser(denoiser), cache.wrap_callback(callback)
                stack.enter_context(cache.installed())
        yield denoiser, callback


def _content_noise(p: GenerationParams, seeds, shape, device) -> torch.Tensor | None:
    """A1111's "latent noise" masked content: each image's seed noise, without variation."""
    if p.inpaint.masked_content != "latent noise":
        return None
    return noise_mod.image_noise(seeds, shape, rng=p.rng, device=device).to(torch.float32)


def _inpaint_channels(model, plan: Plan, batch: int, encode, *, pixels: torch.Tensor | None = None) -> torch.Tensor:
    """The mask and masked-picture channels of a 9-channel inpainting checkpoint (txt2img: grey, all masked;
    ``pixels``: a hires pass's upscaled pictures)."""
    p = plan.params
    if plan.inpaint is None and p.is_img2img:
        pixels = init_pixels(p.init_images, plan, batch)
    return inpaint.image_conditioning(encode, job=plan.inpaint, pixels=pixels, weight=p.inpaint.mask_weight,
                                      batch=batch, size=(plan.width, plan.height)).to(model.device)


def _edit_channels(model, plan: Plan, batch: int) -> torch.Tensor:
    """An InstructPix2Pix model's picture channels: the init picture's VAE latent, unscaled (the posterior
    mean, as A1111 and diffusers give it); zeros without one (txt2img)."""
    p = plan.params
    shape = (batch, model.spec.latent_channels, plan.height // 8, plan.width // 8)
    if not p.is_img2img:
        return torch.zeros(shape, device=model.device)
    latents = encode_images(model, p.init_images, plan, batch)
    return (latents / model.spec.scaling_factor + model.spec.shift_factor).to(model.device)


def _noise_sampler(info, x, full_sigmas, seeds, p: GenerationParams, device):
    """Per-image noise for stochastic samplers: Brownian trees (seeded without ENSD, over the
    uncut schedule, as A1111) for the SDE ones, seeded generators for the ancestral ones."""
    if "brownian" in info.flags:
        return noise_mod.brownian_noise(x, full_sigmas, list(seeds))
    if "ancestral" in info.flags or "stochastic" in info.flags:
        return noise_mod.ancestral_noise(seeds, tuple(x.shape[1:]), rng=p.rng, device=device,
                                         eta_noise_seed_delta=p.eta_noise_seed_delta)
    return None


def _callback(model, plan: Plan, job: int, progress, cancel: Cancellation, control=None, *,
              window: tuple[int, int] | None = None) -> Callable:
    offset, total = window if window is not None else (0, plan.steps_run)

    def on_step(step: int, _total: int, x: torch.Tensor, denoised: torch.Tensor):
        if control is not None:  # A1111's ControlNet guidance window counts finished steps
            control.on_step(step)
        if progress is not None:
            method = plan.params.preview_method  # pipeline/preview.py: Full, Approx NN, Approx cheap, TAESD
            preview = (lambda d=denoised: preview_images(model, d, method)) if denoised is not None else None
            progress(Progress(job=job, job_count=plan.params.n_iter, step=offset + step + 1, steps=total,
                              preview=preview))
        if cancel.interrupted or cancel.skipped:
            cancel.stop_batch()
            return STOP
        return None

    return on_step


def init_pixels(images, plan: Plan, batch: int) -> torch.Tensor:
    """The init pictures resized as asked, image i of the batch from picture i mod n, in [-1, 1]."""
    resized = resized_inits(images, plan)
    return images_to_tensor([resized[i % len(resized)] for i in range(batch)])


def resized_inits(images, plan: Plan) -> list:
    """The init pictures as RGB, resized to the plan's size as its request asks."""
    p = plan.params
    return [resize_image(img.convert("RGB"), plan.width, plan.height, p.resize_mode, enlarge=plan.enlarge)
            for img in images]


def encode_images(model, images, plan: Plan, batch: int) -> torch.Tensor:
    """Resize as asked and VAE-encode to scaled latents (posterior mean: deterministic).

    Each distinct picture is encoded once; a batch larger than the pictures given repeats
    their latents (image i from picture i mod n), as the pixels would be repeated.
    """
    distinct = init_pixels(images, plan, min(len(images), batch))
    latents = encode_pixels(model, distinct, plan.params.vae_encode_method)
    if latents.shape[0] == batch:
        return latents
    return latents[torch.arange(batch) % latents.shape[0]]


def encode_pixels(model, pixels: torch.Tensor, method: str = "Full") -> torch.Tensor:
    """VAE-encode pictures in [-1, 1] to scaled latents (posterior mean: deterministic).

    The VAE runs where the memory mode puts it, in the dtype of the model's VAE precision
    (upcast to float32 where fp16 would overflow, by default), and retries in tiles after an
    out-of-memory error (models/offload.py: ``run_vae``). ``method`` "TAESD": the tiny encoder
    instead (pipeline/vae_type.py).
    """
    from ..models.offload import run_vae

    if method == "TAESD":
        return vae_type.encode(model, pixels)

    mean = run_vae(model, lambda vae, device, dtype: vae.encode(to_device(pixels, device, dtype)).latent_dist.mean,
                   what="encode")
    return (mean.to(torch.float32) - _shift(model)) * model.spec.scaling_factor


def decode_latents(model, latents: torch.Tensor, method: str = "Full"):
    """Decode scaled latents to pictures; a half-precision decode that gives NaNs runs again in float32.
    ``method`` "TAESD": the tiny decoder instead (pipeline/vae_type.py)."""
    from ..models.offload import run_vae

    if method == "TAESD":
        return tensor_to_images(vae_type.decode(model, latents))

    z = latents / model.spec.scaling_factor + _shift(model)
    pixels = run_vae(model, lambda vae, device, dtype: vae.decode(z.to(device, dtype)).sample, nan_check=True,
                     what="decode")
    return tensor_to_images(pixels.float())


def _shift(model) -> float:
    """The latent shift of the model's autoencoder (FLUX: 0.1159; SD: none)."""
    return float(getattr(model.spec, "shift_factor", 0.0) or 0.0)


def flux_fill_channels(model, plan: Plan, batch: int, encode, *, pixels: torch.Tensor | None = None) -> torch.Tensor:
    """FLUX Fill's extra inputs, packed: the masked picture's latent, then the pixel mask as
    8×8 values per latent cell (without a mask everything is repainted, as for txt2img;
    ``pixels``: a hires pass's upscaled pictures)."""
    p = plan.params
    width, height = plan.width, plan.height
    if plan.inpaint is not None:
        job = plan.inpaint
        pixels = inpaint.job_pixels(job, batch)
        mask = inpaint.conditioning_mask(job.mask, round_mask=True).to(pixels)
    else:
        if p.is_img2img:
            pixels = init_pixels(p.init_images, plan, batch)
        elif pixels is None:
            pixels = torch.zeros(batch, 3, height, width)
        mask = torch.ones(1, 1, height, width)
    mask = mask.expand(batch, 1, *pixels.shape[-2:])
    masked = encode(pixels * (1 - mask))
    h, w = masked.shape[-2:]
    cells = mask.reshape(batch, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(batch, 64, h, w)
    return torch.cat([flux.pack(masked), flux.pack(cells.to(masked))], dim=-1).to(model.device)
