"""ControlNet units for FLUX: the same units, maps and infotext as for SD, FLUX ControlNets underneath.

A unit's map (from its preprocessor, as for SD) is VAE-encoded, shifted and scaled like any FLUX
latent and packed into 2×2 patches; the ControlNet turns it, with the noisy latent and the
prompt, into residuals for the transformer's double and single blocks. Several units add their
residuals; each counts only inside its guidance window (A1111's rule, as for SD) and is scaled by
its weight. Union models also get the unit's control type as a mode id (canny 0, tile 1, depth 2,
blur 3, pose 4, gray 5, low quality 6): its ``union_control_type`` when set, else its
preprocessor's, as for SDXL's union models; a ready-made map (module "none") needs the explicit
type (models/union_types.py). The control modes of SD's extension (prompt /
ControlNet more important) weigh CFG's two halves and have no counterpart here: FLUX runs
without CFG by default, so the weight alone applies.

IP-Adapter units (XLabs' FLUX IP-Adapters) read their picture with a CLIP vision model as for SD
(pipeline/control.image_prompt_unit) and add attention to its tokens in the double blocks
(models/ip_adapter.flux_adapters_applied); with true CFG the negative prompt's rows read a black
picture's tokens, as diffusers' FLUX pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidParameter


@dataclass
class FluxUnit:
    unit: object
    net: torch.nn.Module
    #: The packed control latent, one row.
    cond: torch.Tensor
    #: The union mode id as a (1, 1) tensor, or None for single-type ControlNets.
    mode: torch.Tensor | None


@dataclass
class FluxControl:
    """The ControlNet part of a FLUX denoiser; ``step`` is set by the sampler's step callback."""

    units: list[FluxUnit]
    steps: int
    maps: tuple[np.ndarray, ...]
    model_names: tuple[str, ...]
    step: int = field(default=0)
    #: The IP-Adapter units, as SD's ControlStack keeps them (it tells the prompt's rows from the negative's).
    images: object = None

    def on_step(self, step: int) -> None:
        self.step = step
        if self.images is not None:
            self.images.on_step(step)

    def set_conds(self, prompt, negative) -> None:
        if self.images is not None:
            self.images.set_conds(prompt, negative)

    def image_prompts(self, n: int, cond, device) -> list[tuple]:
        """(adapter, tokens for the ``n`` rows of a call with ``cond``, weight) of each IP-Adapter unit in its
        guidance window."""
        if self.images is None:
            return []
        return self.images.image_prompts(n, self.images.prompt_rows(cond, n, device))

    def with_infotext(self, params):
        from .control import control_infotext

        return params.replace(extra_infotext=params.extra_infotext + control_infotext(params.control_units,
                                                                                       self.model_names))

    def residuals(self, tokens: torch.Tensor, sigma: torch.Tensor, cond, img_ids: torch.Tensor,
                  txt_ids: torch.Tensor, guidance: float | None, dtype: torch.dtype):
        """``(block_samples, single_block_samples)`` summed over the active units, or ``(None, None)``."""
        from .control import unit_active

        blocks = singles = None
        rows = tokens.shape[0]
        for u in self.units:
            if not unit_active(u.unit, self.step, self.steps):
                continue
            g = None
            if u.net.config.guidance_embeds:
                g = torch.full((rows,), DEFAULT_GUIDANCE if guidance is None else guidance, device=tokens.device,
                               dtype=torch.float32)
            b, s = u.net(
                hidden_states=tokens.to(dtype),
                controlnet_cond=u.cond.expand(rows, -1, -1).to(tokens.device, dtype),
                controlnet_mode=None if u.mode is None else u.mode.expand(rows, -1).to(tokens.device),
                conditioning_scale=float(u.unit.weight),
                encoder_hidden_states=cond.t5.to(tokens.device, dtype),
                pooled_projections=cond.pooled.to(tokens.device, dtype),
                timestep=sigma.to(dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=g,
                return_dict=False,
            )
            blocks = _add(blocks, b)
            singles = _add(singles, s)
        return blocks, singles


DEFAULT_GUIDANCE = 3.5


def _add(total, new):
    if new is None:
        return total
    new = list(new)
    return new if total is None else [a + b for a, b in zip(total, new)]


def prepare(model, params, *, width: int, height: int, steps: int, encode, crop=None) -> FluxControl | None:
    """Load each unit's FLUX ControlNet (cached on the model), make and encode its map."""
    if not params.control_units:
        return None
    from ..models.controlnet import infotext_name, resolve_controlnet
    from ..models.flux_controlnet import load_flux_controlnet
    from ..models.union_types import flux_slots, union_slot
    from ..imageio.convert import images_to_tensor
    from .control import ControlStack, control_map, control_resources, crop_to_region, image_prompt_unit
    from .flux import pack

    _, folders, ctx = control_resources(model)
    cache = _cache(model)
    init = params.init_images[0] if params.init_images else None
    units, mask = params.control_units, params.mask
    if crop is not None:
        units, init, mask = crop_to_region(units, init, mask, *crop)
    active, maps, names, pictures = [], [], [], []
    for index, unit in enumerate(units):
        path = resolve_controlnet(unit.model, folders, kind=unit.preprocessor.kind, family=model.spec.family)
        if unit.preprocessor.kind == "ip-adapter":
            pictures.append(image_prompt_unit(model, unit, _ip_adapter(model, path, index), index, init, width,
                                              height))
            maps.append(np.asarray(pictures[-1].unit.image.convert("RGB").resize((width, height))))
            names.append(infotext_name(path))
            continue
        key = (str(path), str(model.device), str(model.dtype))
        if key not in cache:
            cache[key] = load_flux_controlnet(path, device=model.device, dtype=model.dtype)
        net = cache[key]
        mode = None
        if net.config.num_mode:  # before the preprocessor runs: a type without a slot is refused
            name = path.stem if path.is_file() else path.name
            slot = union_slot(unit, flux_slots(net.config.num_mode), name, index)
            mode = torch.tensor([[slot]], dtype=torch.long)
        detected = control_map(unit, width, height, init_image=init, mask=mask, ctx=ctx, seed=max(params.seed, 0))
        if detected.shape[2] != 3:
            raise InvalidParameter(f"control_units[{index}].module", unit.module,
                                   "a preprocessor that makes an RGB map (FLUX ControlNets have no inpaint type)")
        from PIL import Image

        latent = encode(images_to_tensor([Image.fromarray(detected)]))
        active.append(FluxUnit(unit, net, pack(latent), mode))
        maps.append(detected)
        names.append(infotext_name(path))
    images = ControlStack(pictures, steps) if pictures else None
    return FluxControl(active, steps, tuple(maps), tuple(names), images=images)


def _ip_adapter(model, path, index: int):
    """The IP-Adapter file at ``path`` loaded (kept with the model's other control models); another kind of
    file is refused naming the unit's model."""
    from ..models.controlnet import inspect_controlnet, load_controlnet

    cache = _cache(model)
    key = (str(path), "ip-adapter", str(model.device), str(model.dtype))
    if key not in cache:
        if inspect_controlnet(path).kind != "ip-adapter":
            raise InvalidParameter(f"control_units[{index}].model", path.stem,
                                   "an IP-Adapter model for an ip-adapter module")
        cache[key] = load_controlnet(path, device=model.device, dtype=model.dtype)
    return cache[key]


def _cache(model) -> dict:
    cache = getattr(model, "_flux_controlnets", None)
    if cache is None:
        cache = {}
        try:
            model._flux_controlnets = cache
        except AttributeError:
            pass
    return cache
