"""A1111's "VAE type for encode" and "VAE type for decode" (its settings ``sd_vae_encode_method`` and
``sd_vae_decode_method``, infotext ``VAE Encoder`` / ``VAE Decoder``): the checkpoint's VAE ("Full",
the default) or TAESD, madebyollin's tiny autoencoder: a speed/quality trade-off.

TAESD works on the same scaled latents as the UNet, so it stands in for the VAE without any other
change; it is a few hundred times cheaper and a little softer. Its files are read from the models
folder's ``VAE-approx/`` (``taesd`` for SD 1.x/2.x, ``taesdxl`` for SDXL, ``taef1`` for FLUX):
``<name>_decoder.safetensors`` and ``<name>_encoder.safetensors`` as madebyollin publishes them, or
a diffusers ``<name>/diffusion_pytorch_model.safetensors`` holding both. The decoder is the one live
previews use (pipeline/preview.py). A request that asks for TAESD where the file is missing is
refused before any work, naming the setting and the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidParameter, ModelError
from ..models.detect import Family
from ..models.seamless import wrapping
from ..params import GenerationParams
from .networks import models_dir_of
from .preview import TAESD_NAMES, _preview_dtype, load_taesd_part, taesd_decoder

log = logging.getLogger(__name__)


def check(model, params: GenerationParams) -> None:
    """Refuse a TAESD method whose file this model's family lacks, before anything runs."""
    if params.vae_decode_method == "TAESD" and taesd_decoder(model, warn=False) is None:
        raise InvalidParameter("vae_decode_method", "TAESD", _missing(model, "decoder"))
    if params.vae_encode_method == "TAESD" and _encodes(params) and taesd_encoder(model) is None:
        raise InvalidParameter("vae_encode_method", "TAESD", _missing(model, "encoder"))


def _missing(model, part: str) -> str:
    name = TAESD_NAMES[Family(model.spec.family).latent_space]
    where = models_dir_of(model).vae_approx_dir
    return (f"Full, or TAESD with {name}_{part}.safetensors (or a diffusers {name}/ folder) in {where}, "
            "which is not there")


def _encodes(params: GenerationParams) -> bool:
    """Whether the request VAE-encodes a picture: img2img and inpainting, or a hires. fix upscaled in pixels."""
    return params.is_img2img or (params.hires is not None and not params.hires.in_latent_space)


def infotext_entries(params: GenerationParams) -> dict[str, str | None]:
    """A1111 writes each method only when it is not Full (the encoder only where a picture is encoded)."""
    return {
        "VAE Encoder": params.vae_encode_method if params.vae_encode_method != "Full" and _encodes(params) else None,
        "VAE Decoder": params.vae_decode_method if params.vae_decode_method != "Full" else None,
    }


def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """TAESD decode of scaled latents: pixels ``[B, 3, 8h, 8w]`` in [-1, 1], float32, on the model's device."""
    decoder = taesd_decoder(model, warn=False)
    if decoder is None:  # the file went away since the request was checked
        raise InvalidParameter("vae_decode_method", "TAESD", _missing(model, "decoder"))
    param = next(decoder.parameters())
    with torch.inference_mode(), wrapping(model, decoder):
        pixels = decoder.decode(latents.detach().to(param.device, param.dtype)).sample
    return pixels.to(torch.float32).clamp(-1.0, 1.0)


def encode(model, pixels: torch.Tensor) -> torch.Tensor:
    """TAESD encode of pixels in [-1, 1]: scaled latents (as the UNet takes them), float32."""
    encoder = taesd_encoder(model)
    if encoder is None:
        raise InvalidParameter("vae_encode_method", "TAESD", _missing(model, "encoder"))
    param = next(encoder.parameters())
    with torch.inference_mode(), wrapping(model, encoder):
        latents = encoder.encode(pixels.to(param.device, param.dtype)).latents
    return latents.to(torch.float32)


# --- the encoder file --------------------------------------------------------------------------------


@dataclass
class _EncoderSlot:
    path: Path | None = None
    encoder: torch.nn.Module | None = None


def taesd_encoder(model) -> torch.nn.Module | None:
    """The model family's TAESD encoder from the models folder (loaded once, kept on the model), or None
    when there is no file (looked for again on each call) or it is not a TAESD encoder (logged once)."""
    slot = getattr(model, "_taesd_encoder", None)
    if slot is None:
        slot = model._taesd_encoder = _EncoderSlot()
    path = models_dir_of(model).find_vae_approx(TAESD_NAMES[Family(model.spec.family).latent_space], "encoder")
    if path is None or path == slot.path:
        return slot.encoder if path is not None else None
    slot.path, slot.encoder = path, None
    try:
        slot.encoder = load_taesd_encoder(path, latent_channels=model.spec.latent_channels, device=model.device,
                                          dtype=_preview_dtype(model))
    except ModelError as exc:
        log.warning("VAE type for encode TAESD: %s", exc)
    return slot.encoder


def load_taesd_encoder(path: str | Path, *, latent_channels: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """diffusers' ``AutoencoderTiny`` with its encoder filled from a TAESD safetensors file: madebyollin's
    encoder file (a ``Sequential``: ``0.weight`` ... ``14.bias``, the same layers in the same order as
    diffusers' ``EncoderTiny.layers``) or diffusers' (``encoder.layers.…``). The decoder is left out."""
    return load_taesd_part(path, "encoder", encoder_state, latent_channels=latent_channels, device=device,
                           dtype=dtype, field="vae_encode_method")


def encoder_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """TAESD encoder weights under diffusers' ``EncoderTiny`` names (``layers.<i>.…``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("decoder."):
            continue
        name = key.removeprefix("encoder.")
        if name.startswith("layers."):
            out[name] = tensor
            continue
        head, _, rest = name.partition(".")
        if not head.isdigit() or not rest:
            raise ModelError(f"{path.name}: unexpected key {key!r} for a TAESD encoder (expected '0.weight' ... "
                             "as in taesd_encoder, or 'encoder.layers.…')", field="vae_encode_method")
        out[f"layers.{int(head)}.{rest}"] = tensor
    if "layers.0.weight" not in out:
        raise ModelError(f"{path.name}: no encoder weights in the file (a decoder file?)", field="vae_encode_method")
    return out
