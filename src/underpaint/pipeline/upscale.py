"""Upscalers for pictures, as AUTOMATIC1111's hires. fix and Extras tab run them.

Two kinds:

- **built-in** ("None", "Lanczos", "Nearest"): a Pillow resize;
- **upscaling models** from the models folder's ``upscale_models/`` (an A1111 install's
  ``models/ESRGAN``, ``models/RealESRGAN``, ``models/SwinIR``, ``models/DAT``, ``models/HAT`` and
  ``models/ScuNET``): ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT and SCUNet networks
  (``models/upscaler.py``), each pass multiplying the size by the model's own scale (4 for most; 1 for
  SCUNet, a denoiser). A model is named by its path without the extension (``4x-UltraSharp``), and the
  files A1111 knows by its names for them (``RealESRGAN_x4plus.pth`` is "R-ESRGAN 4x+", its SwinIR
  download "SwinIR 4x", ``DAT_x4.pth`` "DAT x4", ``scunet_color_real_gan.pth`` "ScuNET GAN"), so the
  names in A1111 infotexts and API requests find the same files.

Either kind enlarges a picture by a scale the way A1111's upscaler step does (:func:`upscale_by`):
the target is the scaled size rounded down to a multiple of 8; a model runs up to three passes
until the picture covers it (a 4x model reaches 2x in one pass, 8x in two); then one Lanczos
resize brings the result to the target exactly. A model runs on the picture in overlapping tiles of
192 pixels (256 for SCUNet; 8 overlapping: A1111's defaults), so its memory stays bounded at any
picture size.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidParameter, UnknownName
from ..params import HIRES_LATENT_MODES, HIRES_PIXEL_UPSCALERS

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..imageio.resize import Enlarge
    from ..models.registry import ModelsDir

log = logging.getLogger(__name__)

#: A1111's names for the Real-ESRGAN files it knows (file name without extension → name).
REALESRGAN_NAMES = {
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
}
#: A1111's name for its default SwinIR model: the file as it downloads it, and as the SwinIR
#: repository releases it.
SWINIR_NAMES = {
    "SwinIR_4x": "SwinIR 4x",
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN": "SwinIR 4x",
}
#: A1111's names for the DAT files it downloads (``dat_enabled_models``).
DAT_NAMES = {"DAT_x2": "DAT x2", "DAT_x3": "DAT x3", "DAT_x4": "DAT x4"}
#: A1111's names for SCUNet's two models: their release files, and the name A1111 saves the GAN one under.
SCUNET_NAMES = {
    "scunet_color_real_gan": "ScuNET GAN",
    "ScuNET": "ScuNET GAN",
    "scunet_color_real_psnr": "ScuNET PSNR",
}
#: Every file A1111 lists under a name of its own (file name without extension → name).
A1111_NAMES = {**REALESRGAN_NAMES, **SWINIR_NAMES, **DAT_NAMES, **SCUNET_NAMES}
#: A1111's tile size and overlap for ESRGAN-type models (its ``ESRGAN_tile`` and ``DAT_tile``
#: settings), in pixels, and for SCUNet (``SCUNET_tile``).
TILE = 192
TILE_OVERLAP = 8
SCUNET_TILE = 256
#: The most passes of a model for one upscale (A1111's limit): a 2x model reaches 8x.
MAX_PASSES = 3


@dataclass(frozen=True)
class UpscalerModelEntry:
    """An upscaling model file in the models folder, under the name requests use."""

    name: str
    path: Path
    #: Path relative to its folder, with the extension (what the API lists as its path).
    filename: str

    @property
    def is_realesrgan(self) -> bool:
        return self.path.stem in REALESRGAN_NAMES


_SCALE_IN_NAME = re.compile(r"(?:^|[^0-9a-z])(?:([1-8])x|x([1-8]))(?:$|[^0-9a-z])", re.IGNORECASE)


def nominal_scale(entry: UpscalerModelEntry) -> int:
    """The scale a model's file name states ("4x-UltraSharp", "RealESRGAN_x2plus": 4, 2), else 4,
    the scale A1111 lists an ESRGAN model with; the file itself is not read for a listing."""
    m = _SCALE_IN_NAME.search(entry.path.stem.replace("plus", ""))
    return int(m.group(1) or m.group(2)) if m else 4


def model_entries(folder: "ModelsDir | None") -> list[UpscalerModelEntry]:
    """The upscaling models in ``folder``, by name (A1111's names for the Real-ESRGAN and SwinIR
    files it knows)."""
    if folder is None:
        return []
    out: dict[str, UpscalerModelEntry] = {}
    for entry in folder.list_upscalers():
        name = A1111_NAMES.get(entry.path.stem, entry.name)
        out.setdefault(name.lower(), UpscalerModelEntry(name, entry.path, entry.filename))
    return sorted(out.values(), key=lambda e: e.name.lower())


def names(folder: "ModelsDir | None") -> tuple[str, ...]:
    """Every picture upscaler a request may name: the built-in ones, then the models."""
    return (*HIRES_PIXEL_UPSCALERS, *(e.name for e in model_entries(folder)))


def find_model(folder: "ModelsDir | None", name: str) -> UpscalerModelEntry | None:
    """The model ``name`` means: its listed name (case aside), its file name, or its path without
    the extension; never a path outside the listing. None: no such model."""
    text = name.strip()
    entries = model_entries(folder)
    for e in entries:
        if e.name.lower() == text.lower():
            return e
    for e in entries:
        if text in (e.filename, e.path.name, e.path.stem):
            return e
    return None


def builtin_name(name: str) -> str | None:
    """A built-in upscaler's own spelling, or None when ``name`` is not one."""
    return next((n for n in HIRES_PIXEL_UPSCALERS if n.lower() == name.strip().lower()), None)


def resolve(folder: "ModelsDir | None", name: str, field: str, *, hires: bool = False) -> str | UpscalerModelEntry:
    """A built-in upscaler's name, or the model ``name`` means; else :class:`UnknownName` for
    ``field``, listing what there is (``hires``: the latent modes first, as hires. fix offers them)."""
    builtin = builtin_name(name)
    if builtin is not None:
        return builtin
    entry = find_model(folder, name)
    if entry is None:
        from ..models.download import known_for_file

        where = folder.folder("upscalers") if folder is not None else "the models folder's upscale_models/"
        known = next((k for stem, listed in A1111_NAMES.items()
                      if listed.lower() == name.strip().lower() and (k := known_for_file(stem))), None)
        hint = (f"{name.strip()} is A1111's name for {known.filename}; `underpaint download {known.name}` "
                f"puts it in {where}" if known else f"upscaling models, e.g. 4x-UltraSharp.pth, go in {where}")
        raise UnknownName(field, name, (*(HIRES_LATENT_MODES if hires else ()), *names(folder)), hint=hint)
    return entry


def resolve_upscaler(folder: "ModelsDir | None", name: str, field: str) -> str | UpscalerModelEntry:
    """:func:`resolve` for a request whose whole point is the upscale (Extras' first upscaler):
    "None" is refused too."""
    found = resolve(folder, name, field)
    if found == "None":
        raise InvalidParameter(field, name, "an upscaler other than None")
    return found


# --- one pass -----------------------------------------------------------------------------------

OnePass = Callable[["Image", float], "Image"]


def builtin_pass(name: str) -> OnePass:
    """A built-in upscaler's pass: a Pillow resize by the scale asked (each side cut to an integer)."""
    from PIL import Image as PILImage

    resample = PILImage.Resampling.NEAREST if name == "Nearest" else PILImage.Resampling.LANCZOS

    def run(image: "Image", scale: float) -> "Image":
        return image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)

    return run


class _ModelCache:
    """The last upscaling model used, kept loaded (they are small: 5-70 MB), one load at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model = None

    def get(self, path: Path, device: str):
        import torch

        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, str(device))
        with self._lock:
            if self._key != key:
                from ..models.upscaler import load_upscaler

                self._model, self._key = None, None  # the old one goes before the new one loads
                self._model = load_upscaler(path, device=device, dtype=torch.float32)
                self._key = key
                log.info("loaded upscaler %s (%s, %dx)", path.name, self._model.arch, self._model.scale)
            return self._model

    def clear(self) -> None:
        with self._lock:
            self._model, self._key = None, None


MODEL_CACHE = _ModelCache()


def model_pass(entry: UpscalerModelEntry, *, device: str = "cpu",
               cancel: Callable[[], None] | None = None) -> OnePass:
    """An upscaling model's pass: the model once over the picture, in tiles (its own scale, whatever
    the scale asked). float32, on ``device``."""
    from ..models.upscaler import upscale_image

    from ..models.upscaler import ARCH_SCUNET

    def run(image: "Image", scale: float) -> "Image":
        model = MODEL_CACHE.get(entry.path, device)
        tile = SCUNET_TILE if model.arch == ARCH_SCUNET else TILE
        return upscale_image(model, image, tile=tile, overlap=TILE_OVERLAP, cancel=cancel)

    return run


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The size :func:`upscale_by` makes: each side times ``scale``, rounded down to a multiple of 8."""
    return int(width * scale // 8 * 8), int(height * scale // 8 * 8)


def upscale_by(image: "Image", scale: float, one_pass: OnePass) -> "Image":
    """``image`` enlarged by ``scale`` as A1111's upscaler step does it: the target is the scaled
    size rounded down to a multiple of 8; passes run (at most :data:`MAX_PASSES`) until the picture
    covers the target; one that leaves the size unchanged ends them; then a Lanczos resize to the
    target if the size differs. At scale 1 exactly one pass runs (the model's own enhancement,
    resized back), where A1111 runs a 4x model three times (64x) before resizing back."""
    from PIL import Image as PILImage

    dest = target_size(image.width, image.height, scale)
    for done in range(MAX_PASSES):
        if image.width >= dest[0] and image.height >= dest[1] and (scale != 1 or done):
            break
        before = image.size
        image = one_pass(image, scale)
        if image.size == before:
            break
    if image.size != dest:
        image = image.resize(dest, resample=PILImage.Resampling.LANCZOS)
    return image


def picture_pass(upscaler: "str | UpscalerModelEntry", *, device: str = "cpu",
                 cancel: Callable[[], None] | None = None) -> OnePass:
    """The pass of a resolved upscaler (:func:`resolve`): built-in or model."""
    if isinstance(upscaler, str):
        return builtin_pass(upscaler)
    return model_pass(upscaler, device=device, cancel=cancel)


def enlarger(one_pass: OnePass) -> "Enlarge":
    """An upscaler's pass (:func:`picture_pass`) as the enlarging step of a resize (hires. fix's
    picture upscale, A1111's "Upscaler for img2img"; imageio/resize.py ``scale_to``):
    :func:`upscale_by` the scale asked."""
    return lambda image, scale: upscale_by(image, scale, one_pass)


# --- the Extras tab's Upscale step (the API's /extra-* routes and `underpaint upscale`) -----------


@dataclass(frozen=True)
class ExtrasJob:
    """A1111's Extras "Upscale" step, checked: each upscaler a built-in one's name or a model's
    entry (None: "None"); ``mode`` 0 scales by ``scale``, 1 to ``width`` x ``height`` (``crop``:
    centred on a black canvas of that size); ``second`` is blended in at ``visibility``."""

    upscaler: "str | UpscalerModelEntry | None"
    second: "str | UpscalerModelEntry | None"
    visibility: float
    mode: int
    scale: float
    width: int
    height: int
    crop: bool
    #: A1111's "GFPGAN visibility" and "CodeFormer visibility" (with its "CodeFormer weight"): after the
    #: upscale, the picture's faces restored (pipeline/face_restore.py) and blended in by this much, GFPGAN
    #: first; 0: off. ``folder``: the models folder holding the restorers' files.
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.5
    folder: object = None

    @property
    def uses_model(self) -> bool:
        """Whether a network runs (an upscaling model, the face restorer): then the job goes on the
        generation queue."""
        if self.gfpgan_visibility > 0 or self.codeformer_visibility > 0:
            return True
        chosen = [self.upscaler] + ([self.second] if self.visibility > 0 else [])
        return self.upscaler is not None and any(isinstance(u, UpscalerModelEntry) for u in chosen)


def _display_name(upscaler: "str | UpscalerModelEntry") -> str:
    return upscaler if isinstance(upscaler, str) else upscaler.name


def extras_scale(job: ExtrasJob, image: "Image") -> float:
    if job.mode == 1:
        return max(job.width / image.width, job.height / image.height)
    return job.scale


def upscale(image: "Image", upscaler: "str | UpscalerModelEntry", scale: float,
            device: str = "cpu") -> "Image":
    """A1111's upscaler step (:func:`upscale_by`) with a resolved upscaler (:func:`resolve`)."""
    return upscale_by(image, scale, picture_pass(upscaler, device=device))


def postprocess(job: ExtrasJob, image: "Image", device: str = "cpu") -> tuple["Image", str]:
    """One picture through the Upscale step, then GFPGAN (A1111's order): the result (RGB) and its
    postprocessing text."""
    from PIL import Image as PILImage

    image = image.convert("RGB")
    result, text = _upscale_step(job, image, device) if job.upscaler is not None else (image, "")
    from .face_restore import face_restorer_for, restore_faces

    info = [text] if text else []
    for name, visibility in (("GFPGAN", job.gfpgan_visibility), ("CodeFormer", job.codeformer_visibility)):
        if visibility <= 0:
            continue
        restored = restore_faces(face_restorer_for(job.folder, device, name), result, weight=job.codeformer_weight)
        result = restored if visibility >= 1 else PILImage.blend(result, restored, visibility)
        info.append(f"{name} visibility: {round(visibility, 3)}")
        if name == "CodeFormer":
            info.append(f"CodeFormer weight: {round(job.codeformer_weight, 3)}")
    return result, ", ".join(info)


def _upscale_step(job: ExtrasJob, image: "Image", device: str) -> tuple["Image", str]:
    from PIL import Image as PILImage

    scale = extras_scale(job, image)
    info: dict[str, str] = {}
    if job.mode == 1:
        info["Postprocess upscale to"] = f"{job.width}x{job.height}"
    else:
        info["Postprocess upscale by"] = str(job.scale)

    def step(upscaler: "str | UpscalerModelEntry") -> "Image":
        result = upscale(image, upscaler, scale, device)
        if job.mode == 1 and job.crop:
            canvas = PILImage.new("RGB", (job.width, job.height))
            canvas.paste(result, (job.width // 2 - result.width // 2, job.height // 2 - result.height // 2))
            info["Postprocess crop to"] = f"{job.width}x{job.height}"
            result = canvas
        return result

    result = step(job.upscaler)
    info["Postprocess upscaler"] = _display_name(job.upscaler)
    if job.second is not None and job.visibility > 0:
        result = PILImage.blend(result, step(job.second), job.visibility)
        info["Postprocess upscaler 2"] = _display_name(job.second)
    return result, ", ".join(f"{key}: {value}" for key, value in info.items())
