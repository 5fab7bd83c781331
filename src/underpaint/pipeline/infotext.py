"""The A1111 infotext of one generated image, from the request that made it."""

from __future__ import annotations

import math

from .. import __version__
from ..imageio.infotext import format_infotext, order_params
from ..params import GenerationParams
from ..sampling.names import infotext_schedule, infotext_writes_ensd, sampler_info
from .deepcache import infotext_entries as deepcache_infotext
from .first_block_cache import infotext_entries as first_block_cache_infotext
from .guidance import infotext_entries as guidance_infotext
from .vae_type import infotext_entries as vae_type_infotext
from ..models.freeu import infotext_entries as freeu_infotext
from .hires import hires_infotext
from .records import ModelInfo

VERSION = f"underpaint {__version__}"


def infotext_params(params: GenerationParams, info: ModelInfo, *, width: int, height: int, seed: int, subseed: int) -> dict:
    """Key/value pairs in A1111 1.10's order; None values are left out when written."""
    p, opts = params, params.sampler_options
    takes = sampler_info(p.sampler).params
    variation = p.subseed_strength > 0
    values = {
        "Steps": p.steps,
        "Sampler": p.sampler,
        "Schedule type": infotext_schedule(p.sampler, p.scheduler),
        "CFG scale": p.cfg_scale,
        "Image CFG scale": p.image_cfg_scale if info.edit_model else None,
        "Seed": seed,
        "Face restoration": p.face_restoration_model if p.restore_faces else None,
        "Size": f"{width}x{height}",
        "Model hash": info.short_hash,
        "Model": info.name,
        "VAE hash": info.vae_hash,
        "VAE": info.vae_name,
        "Variation seed": subseed if variation else None,
        "Variation seed strength": p.subseed_strength if variation else None,
        "Seed resize from": f"{p.seed_resize_from_w}x{p.seed_resize_from_h}" if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0 else None,
        # txt2img records its hires. fix strength here (A1111 writes it only with hires. fix).
        "Denoising strength": p.strength if p.is_img2img else (p.hires.strength if p.hires is not None else None),
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "ENSD": p.eta_noise_seed_delta if p.eta_noise_seed_delta and infotext_writes_ensd(p.sampler, opts.eta) else None,
        # A1111 writes the ratio used (img2img: its own setting when that applied), and the hires
        # pass's (its own, else the first pass's) with hires. fix; neither when 0.
        "Token merging ratio": p.token_merging_ratio or None,
        "Token merging ratio hr": (p.hires_token_merging_ratio or None) if p.hires is not None else None,
        "RNG": {"cpu": "CPU", "nv": "NV"}.get(p.rng),
        "Tiling": True if p.tiling else None,
        # A1111's txt2img adds its hires keys before sampling, the sampler's own keys during it.
        **hires_infotext(p),
        # A1111 adds these as img2img's (and hires. fix's) sampling starts, before the sampler's keys.
        "Noise multiplier": p.noise_multiplier if p.noise_multiplier != 1.0 and p.is_img2img else None,
        "Extra noise": p.extra_noise if p.extra_noise and (p.is_img2img or p.hires is not None) else None,
        **_eta_entry(p),
        "Schedule min sigma": opts.sigma_min,
        "Schedule max sigma": opts.sigma_max,
        "Schedule rho": opts.rho,
        # A1111 writes the Beta schedule's shape whenever a pass uses it.
        **_beta_entries(p),
        # A1111 1.10's names for the churn settings of Euler, Heun and DPM2 (s_noise also reaches
        # the ancestral and SDE samplers); written only for a sampler that takes the setting.
        "Sigma churn": (opts.s_churn or None) if "s_churn" in takes else None,
        "Sigma tmin": (opts.s_tmin or None) if "s_tmin" in takes else None,
        "Sigma tmax": opts.s_tmax if opts.s_tmax != math.inf and "s_tmax" in takes else None,
        "Sigma noise": opts.s_noise if opts.s_noise != 1.0 and "s_noise" in takes else None,
        "Discard penultimate sigma": True if opts.discard_penultimate_sigma else None,
        # Where it applied: txt2img's start with a k-diffusion sampler on a Stable Diffusion model.
        "SGM noise multiplier": True if p.sgm_noise_multiplier and not p.is_img2img and info.family != "flux"
        and "timestep" not in sampler_info(p.sampler).flags else None,
        # A1111's setting key, written away from its default 3 for the sampler it changes.
        "UniPC order": opts.unipc_order if opts.unipc_order != 3 and p.sampler == "UniPC" else None,
        **vae_type_infotext(p),
        # A1111 adds these while sampling, after the sampler's keys.
        **guidance_infotext(p),
        **deepcache_infotext(p.deepcache),
        **first_block_cache_infotext(p.first_block_cache),
        **freeu_infotext(p.freeu),
    }
    values.update(dict(p.extra_infotext))
    values["Version"] = VERSION
    return order_params({k: v for k, v in values.items() if v is not None})


def _beta_entries(p: GenerationParams) -> dict:
    schedules = [infotext_schedule(p.sampler, p.scheduler)]
    if p.hires is not None and not p.is_img2img:
        schedules.append(infotext_schedule(p.hires.sampler or p.sampler, p.hires.scheduler or p.scheduler))
    if "Beta" not in schedules:
        return {}
    opts = p.sampler_options
    return {"Beta schedule alpha": opts.beta_alpha, "Beta schedule beta": opts.beta_beta}


def _eta_entry(p: GenerationParams) -> dict:
    """A1111 records eta only for a sampler that takes it and only away from its default (1 for
    the ancestral and SDE samplers, 0 for DDIM), DDIM's under its own key, "Eta DDIM"."""
    eta, info = p.sampler_options.eta, sampler_info(p.sampler)
    if eta is None or "eta" not in info.params:
        return {}
    ddim = "timestep" in info.flags
    return {} if eta == (0.0 if ddim else 1.0) else {"Eta DDIM" if ddim else "Eta": eta}


def build_infotext(params: GenerationParams, info: ModelInfo, *, width: int, height: int, seed: int, subseed: int) -> str:
    values = infotext_params(params, info, width=width, height=height, seed=seed, subseed=subseed)
    return format_infotext(params.prompt, params.negative_prompt, values)
