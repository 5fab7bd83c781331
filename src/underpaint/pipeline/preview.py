"""Live previews: a picture of a sampling step's denoised latent, made one of four ways.

These are AUTOMATIC1111's "Live preview method" values (``show_progress_type``):

``Full``
    The checkpoint's own VAE, as the final picture is made. Exact, and the most expensive: at
    1024² (SDXL, FLUX) a decode costs about as much as a sampling step on a GPU, far more on a CPU.
``Approx cheap``
    A fixed linear map from the latent channels to RGB plus a bias, per latent family (SD 1.x/2.x,
    SDXL, FLUX). Practically free. The picture has the latent's size, 1/8 of the final one in each
    direction, as in A1111: it is not upscaled here, so the PNG sent to a client stays small and
    the browser scales it for display.
``TAESD``
    madebyollin's tiny autoencoder decoders (``taesd`` for SD 1.x/2.x, ``taesdxl`` for SDXL,
    ``taef1`` for FLUX), read from the models folder's ``VAE-approx/`` as safetensors and run as
    diffusers' ``AutoencoderTiny``. Full size, a few milliseconds per picture on a GPU. Without
    the file the preview is Approx cheap, with one warning per loaded model.
``Approx NN``
    A1111's own small network ships as a pickled ``.pt`` file, which underpaint never loads. The
    value is accepted and means TAESD when its decoder file is there, else Approx cheap (silently:
    it is the default).

All four take ``denoised`` as the sampler holds it: the scaled latent ``(z - shift) * scale`` of
:mod:`~underpaint.pipeline.generate`, unpacked ``[B, C, H/8, W/8]`` also for FLUX (the transformer
packs 2×2 patches only inside its own call). That is the space the linear tables were fitted in,
and the space the TAESD decoders take (their diffusers configs have ``scaling_factor`` 1.0 and
``shift_factor`` 0.0, so a diffusers pipeline hands them its scaled latents as they are).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelError
from ..imageio.convert import tensor_to_images
from ..models.detect import Family
from ..params import preview_method_name
from .networks import models_dir_of

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("underpaint.preview")

# --- Approx cheap ----------------------------------------------------------------------------------
# Rows are latent channels, columns R, G, B; pixels = latent · table + bias, in [-1, 1].

#: SD 1.x/2.x (one VAE): Keturn's least-squares fit, published at
#: discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204 and used since by
#: A1111's "Approx cheap" and InvokeAI; fitted without a bias.
_SD_TABLE = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
_SD_BIAS = (0.0, 0.0, 0.0)

#: SDXL: the fit with a bias published in ComfyUI's comfy/latent_formats.py (class SDXL) and
#: reused by SwarmUI and Forge (the numbers only).
_SDXL_TABLE = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

#: FLUX.1 (16 channels): the fit published in ComfyUI's comfy/latent_formats.py (class Flux) and
#: reused by Forge, SwarmUI and stable-diffusion.cpp (the numbers only).
_FLUX_TABLE = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)


@dataclass(frozen=True)
class LinearPreview:
    """One family's latent → RGB map."""

    table: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]


LINEAR_PREVIEWS: dict[Family, LinearPreview] = {
    Family.SD1: LinearPreview(_SD_TABLE, _SD_BIAS),
    Family.SD2: LinearPreview(_SD_TABLE, _SD_BIAS),
    Family.SDXL: LinearPreview(_SDXL_TABLE, _SDXL_BIAS),
    Family.FLUX: LinearPreview(_FLUX_TABLE, _FLUX_BIAS),
}

#: The TAESD decoder each family takes: ``VAE-approx/<name>_decoder.safetensors``.
TAESD_NAMES: dict[Family, str] = {Family.SD1: "taesd", Family.SD2: "taesd", Family.SDXL: "taesdxl",
                                  Family.FLUX: "taef1"}


def preview_images(model, denoised: torch.Tensor, method: str) -> list["Image"]:
    """Pictures of ``denoised`` (scaled latents, ``[B, C, h, w]``), one per batch image, by ``method``."""
    method = preview_method_name(method)
    if method == "Full":
        from .generate import decode_latents

        return decode_latents(model, denoised)
    if method in ("TAESD", "Approx NN"):
        decoder = taesd_decoder(model, warn=method == "TAESD")
        if decoder is not None:
            return tensor_to_images(taesd_pixels(decoder, denoised))
    return tensor_to_images(cheap_pixels(model.spec.family, denoised))


def cheap_pixels(family: Family | str, latents: torch.Tensor) -> torch.Tensor:
    """Approx cheap: ``[B, C, h, w]`` latents → ``[B, 3, h, w]`` pixels in [-1, 1] (float32, on the CPU)."""
    linear = LINEAR_PREVIEWS[Family(family).latent_space]
    channels = len(linear.table)
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ModelError(f"live preview: got a latent of shape {tuple(latents.shape)}, expected "
                         f"[batch, {channels}, height, width] for a {Family(family).value} model")
    with torch.inference_mode():
        x = latents.detach().to(torch.float32)
        table = torch.tensor(linear.table, dtype=torch.float32, device=x.device)
        bias = torch.tensor(linear.bias, dtype=torch.float32, device=x.device)
        rgb = torch.einsum("bchw,cr->brhw", x, table) + bias[None, :, None, None]
        return rgb.clamp(-1.0, 1.0).cpu()


# --- TAESD -----------------------------------------------------------------------------------------


@dataclass
class _TaesdSlot:
    """What the model holds about its preview decoder: the file, the network (None: it failed), whether
    the missing file was reported."""

    path: Path | None = None
    decoder: torch.nn.Module | None = None
    warned: bool = False


def taesd_decoder(model, *, warn: bool = True) -> torch.nn.Module | None:
    """The model family's TAESD decoder from the models folder (loaded once, kept on the model), or None.

    No file: None, and (``warn``) one warning per loaded model saying where the file goes; the
    folder is looked at again on each call, so a file put there later is picked up without a
    restart. A file that is not a TAESD decoder for these latents: None, with one warning naming it.
    """
    slot = _slot(model)
    family = Family(model.spec.family)
    name = TAESD_NAMES[family.latent_space]
    path = models_dir_of(model).find_vae_approx(name)
    if path is not None and path == slot.path:
        return slot.decoder
    if path is None:
        if warn and not slot.warned:
            slot.warned = True
            where = models_dir_of(model).vae_approx_dir
            log.warning("live preview method TAESD: no %s_decoder.safetensors (or %s/ diffusers folder) in %s; "
                        "showing Approx cheap previews instead", name, name, where)
        return None
    slot.path, slot.decoder = path, None
    try:
        slot.decoder = load_taesd_decoder(path, latent_channels=model.spec.latent_channels,
                                          device=model.device, dtype=_preview_dtype(model))
    except ModelError as exc:  # remembered with its path: the file is not read again
        log.warning("live preview method TAESD: %s; showing Approx cheap previews instead", exc)
    return slot.decoder


def taesd_pixels(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """TAESD decode of scaled latents to ``[B, 3, 8h, 8w]`` pixels in [-1, 1] (float32, on the CPU)."""
    param = next(decoder.parameters())
    with torch.inference_mode():
        pixels = decoder.decode(latents.detach().to(param.device, param.dtype)).sample
        return pixels.to(torch.float32).clamp(-1.0, 1.0).cpu()


def load_taesd_decoder(path: str | Path, *, latent_channels: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build diffusers' ``AutoencoderTiny`` and fill its decoder from a TAESD safetensors file.

    Two layouts are read: madebyollin's decoder file (a ``Sequential`` whose indices name the
    layers, ``1.weight`` ... ``19.bias``) and diffusers' (``decoder.layers.0.weight`` ..., an
    ``AutoencoderTiny`` file whose encoder is ignored). The latent channels must be the model's.
    """
    return load_taesd_part(path, "decoder", decoder_state, latent_channels=latent_channels, device=device,
                           dtype=dtype, field="show_progress_type")


def load_taesd_part(path: str | Path, part: str, state_of, *, latent_channels: int, device: torch.device | str,
                    dtype: torch.dtype, field: str) -> torch.nn.Module:
    """diffusers' ``AutoencoderTiny`` with its ``part`` ("encoder" or "decoder") filled from a TAESD
    safetensors file, whose tensors ``state_of(state, path)`` names as that part's; the other part is
    left out. A file that is not safetensors, cannot be read, is for other latents or is not that
    part is a :class:`ModelError` naming ``field``."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path.name}: a TAESD {part} is read from .safetensors only", field=field)
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file becomes one clear error
        raise ModelError(f"{path}: not a readable safetensors file ({exc})", field=field) from exc
    weights = state_of(state, path)
    if part == "decoder":  # the latents go into the decoder's first layer, out of the encoder's last
        found = weights["layers.0.weight"].shape[1]
    else:
        found = weights[f"layers.{max(int(key.split('.')[1]) for key in weights)}.weight"].shape[0]
    if found != latent_channels:
        raise ModelError(f"{path.name}: {'a decoder' if part == 'decoder' else 'an encoder'} for {found}-channel "
                         f"latents, expected {latent_channels} (taesd for SD 1.x/2.x, taesdxl for SDXL, taef1 for "
                         "FLUX)", field=field)
    with torch.inference_mode(False), torch.no_grad():
        tiny = AutoencoderTiny(latent_channels=latent_channels)
        module = getattr(tiny, part)
        try:
            missing, unexpected = module.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # a layer of another shape (another TAESD variant)
            raise ModelError(f"{path.name}: not a TAESD {part} ({str(exc).splitlines()[-1].strip()})",
                             field=field) from exc
        if missing or unexpected:
            raise ModelError(f"{path.name}: not a TAESD {part} (missing {sorted(missing)[:4]}, unexpected "
                             f"{sorted(unexpected)[:4]})", field=field)
        setattr(tiny, "decoder" if part == "encoder" else "encoder", None)
        module.to(device, dtype)  # the plain module: ModelMixin.to warns about dtype casts
    return tiny.requires_grad_(False).eval()


def decoder_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """TAESD decoder weights under diffusers' ``DecoderTiny`` names (``layers.<i>.…``).

    madebyollin's decoder is ``Sequential(Clamp, conv, ReLU, Block × 3, Upsample, conv, …)``;
    diffusers' ``DecoderTiny.layers`` is the same list without the leading Clamp (its forward
    applies the clamp itself), so original layer ``n`` is diffusers layer ``n - 1`` and the names
    inside a block (``conv.0``, ``conv.2``, ``conv.4``) are the same.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix("decoder.")
        if name.startswith("layers."):  # diffusers' AutoencoderTiny
            out[name] = tensor
            continue
        if key.startswith("encoder."):
            continue
        head, _, rest = name.partition(".")
        if not head.isdigit() or int(head) < 1 or not rest:
            raise ModelError(f"{path.name}: unexpected key {key!r} for a TAESD decoder "
                             "(expected '1.weight' ... as in taesd_decoder, or 'decoder.layers.…')",
                             field="show_progress_type")
        out[f"layers.{int(head) - 1}.{rest}"] = tensor
    if "layers.0.weight" not in out:
        raise ModelError(f"{path.name}: no decoder weights in the file (an encoder file?)", field="show_progress_type")
    return out


def _slot(model) -> _TaesdSlot:
    slot = getattr(model, "_preview_taesd", None)
    if slot is None:
        slot = _TaesdSlot()
        model._preview_taesd = slot
    return slot


def _preview_dtype(model) -> torch.dtype:
    """The model's dtype on an accelerator (TAESD is trained to run in half precision), float32 on the CPU."""
    device = torch.device(model.device)
    return torch.float32 if device.type == "cpu" else model.dtype
