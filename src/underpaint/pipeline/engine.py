"""The engine: a loaded checkpoint plus ``generate(params)``, the one path every request takes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..params import GenerationParams
from .records import Cancellation, ModelInfo, Progress, Result

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..errors import OutOfMemory
    from ..models.loader import LoadedModel
    from ..models.optimize import SpeedOptions


class Engine:
    """Holds one checkpoint on its device and turns :class:`GenerationParams` into images.

    >>> engine = Engine.load("v1-5-pruned-emaonly.safetensors")      # doctest: +SKIP
    >>> result = engine.img2img(photo, prompt="oil painting", strength=0.6, seed=1234)  # doctest: +SKIP
    >>> result.images[0].save("painting.png")                          # doctest: +SKIP
    """

    def __init__(self, model: "LoadedModel", *, models_dir: Any = None):
        self.model = model
        self.models_dir = models_dir
        #: The refiner checkpoint last used (A1111's Refiner), kept for the next request: (path, model).
        self._refiner: tuple[Path, "LoadedModel"] | None = None
        if models_dir is not None:
            # LoRAs, embeddings and ControlNets of a request are found in the engine's models folder.
            model.models_dir = models_dir

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        models_dir: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        vae: str | Path | None = None,
        prediction: str | None = None,
        clip_l: str | Path | None = None,
        t5: str | Path | None = None,
        vram: str = "high",
        optimize: "str | SpeedOptions | None" = None,
        attention: str | None = None,
        vae_precision: str = "auto",
    ) -> "Engine":
        """Load a checkpoint by path or by name from the models folder; never touches the network.

        ``clip_l`` and ``t5`` are FLUX's separate text encoder files (paths, or names in the
        models folder's ``text_encoders/``); SD checkpoints carry their own.
        ``vram`` is the memory mode (high, medium or low; see :mod:`underpaint.models.offload`):
        below high the weights are read into host memory and only the parts the mode keeps
        on the device go there.
        ``optimize`` (``"channels_last,fused_qkv,fp8,compile,cuda_graphs,aot"``, any that go together, or a
        :class:`~underpaint.models.optimize.SpeedOptions`) and ``attention`` (auto, flash,
        efficient, cudnn, math) are the speed switches of :mod:`underpaint.models.optimize`;
        none is on by default (``fp8`` changes the picture: a speed/quality trade-off).
        ``vae_precision`` is the dtype of every VAE call (auto, fp32, fp16 or bf16; see
        :data:`underpaint.models.modes.VAE_PRECISIONS`; :attr:`vae_precision` changes it later):
        ``auto`` runs SDXL's and FLUX's VAE in float32 when the model is fp16, as diffusers does;
        ``fp16`` and ``bf16`` are faster and change the picture slightly; ``bf16`` is refused on a
        CUDA device without it.
        """
        from ..models.device import pick_placement
        from ..models.loader import load_model
        from ..models.offload import check_vae_precision, check_vram, place, set_vae_precision
        from ..models.optimize import SpeedOptions, apply, check
        from ..models.registry import ModelsDir, default_models_dir

        vram = check_vram(vram)
        speed = optimize if isinstance(optimize, SpeedOptions) else SpeedOptions.parse(optimize, attention=attention)
        folder = ModelsDir(Path(models_dir) if models_dir else default_models_dir())
        path = folder.resolve_checkpoint(str(model))
        vae_path = folder.resolve_vae(str(vae)) if vae else None
        encoders = {key: folder.resolve_text_encoder(str(value)) for key, value in (("clip_l", clip_l), ("t5", t5))
                    if value}
        from ..models.flux_loader import is_flux

        flux = is_flux(path)
        placement = pick_placement(device, dtype, family="flux" if flux else None)
        if flux:
            encoders["tokenizer_dir"] = folder.text_encoders_dir
            found = _flux_companions(path, folder, given={**encoders, "vae": vae_path})
            encoders.update({k: v for k, v in found.items() if k != "vae"})
            vae_path = found.get("vae", vae_path)
        check(speed, device=placement.device, vram=vram)  # before the slow part
        vae_precision = check_vae_precision(vae_precision, placement.device)
        load_to = placement.device if vram == "high" else "cpu"
        loaded = load_model(path, device=load_to, dtype=placement.dtype, vae=vae_path, prediction=prediction,
                            **encoders)
        place(loaded, vram, device=placement.device)
        set_vae_precision(loaded, vae_precision)
        if speed != SpeedOptions():
            apply(loaded, speed)
        return cls(loaded, models_dir=folder)

    def use_vae(self, vae: str | Path | None) -> bool:
        """Run the loaded model with the VAE ``vae`` (a file or diffusers VAE folder, by path or by
        name in the models folder's vae/, as ``Engine.load``'s ``vae=``), or with the checkpoint's
        own VAE again for None, without reading the rest of the checkpoint: the pictures are those
        of ``Engine.load(checkpoint, vae=vae)`` with the same settings, and the infotext's "VAE hash"
        and "VAE" follow.

        The new weights are copied into the running VAE module in place
        (:mod:`underpaint.models.vae_swap`), so the memory mode's placement and pinned host copies,
        ``channels_last``, the compiled encoder/decoder and the VAE precision all stay. Returns
        False, having changed nothing, where that cannot give the same model: a VAE whose config
        differs from the running one (a diffusers VAE folder whose config says ``force_upcast``
        false, other channels), the own VAE of a FLUX file that carries one, or a FLUX model's own
        VAE that the models folder cannot name; load the checkpoint again with ``vae=`` then.
        A VAE that cannot be read or does not suit the model raises before anything changes.

        FLUX files carry no VAE as a rule: their "own" VAE is the ``ae``/``flux`` file in the models
        folder that ``Engine.load`` picks, and it is swapped in like any other file.
        """
        from ..models.vae_swap import swap_vae

        folder = self.models_dir
        if vae:
            path: Path | None = folder.resolve_vae(str(vae)) if hasattr(folder, "resolve_vae") else Path(vae)
        else:
            path = None
            if self.model.spec.family.value == "flux" and Path(self.model.path).is_file():
                path = self._flux_own_vae()
                if path is None:
                    return False
        return swap_vae(self.model, path)

    def _flux_own_vae(self) -> Path | None:
        """The VAE file ``Engine.load`` takes for a FLUX file without ``vae=``: the models folder's
        only ``ae*``/``flux*`` VAE; None where the file carries its own or nothing names one."""
        from ..models.flux_loader import components_needed

        path = Path(self.model.path)
        if "vae" not in components_needed(path) or not hasattr(self.models_dir, "list_vaes"):
            return None
        # Only the VAE is looked for: the text encoders count as given.
        return _flux_companions(path, self.models_dir, given={"clip_l": path, "t5": path}).get("vae")

    def refiner_model(self, checkpoint: str | Path) -> "LoadedModel":
        """The checkpoint a Refiner (or Hires checkpoint) request names (a path, or a name in the models
        folder), loaded like the engine's own model (device, dtype, memory mode; not its ``--optimize``
        switches) and kept while the requests that follow name it; the one kept before is let go, and
        so is it when a request names none."""
        from ..models.loader import load_model
        from ..models.offload import place, set_vae_precision, vae_precision_of

        folder = self.models_dir
        path = Path(folder.resolve_checkpoint(str(checkpoint)) if hasattr(folder, "resolve_checkpoint") else checkpoint)
        if self._refiner is not None and self._refiner[0] == path:
            return self._refiner[1]
        self._refiner = None  # the last one goes before the next one comes in
        plan = getattr(self.model, "offload", None)
        mode = plan.mode if plan is not None else "high"
        dtype = next(self.model.unet.parameters()).dtype
        loaded = load_model(path, device=self.model.device if mode == "high" else "cpu", dtype=dtype)
        place(loaded, mode, device=self.model.device)
        set_vae_precision(loaded, vae_precision_of(self.model))
        if self.models_dir is not None:
            loaded.models_dir = self.models_dir
        self._refiner = (path, loaded)
        return loaded

    @property
    def vae_precision(self) -> str:
        """The dtype every VAE call runs in: auto, fp32, fp16 or bf16 (``--vae-precision``)."""
        from ..models.offload import vae_precision_of

        return vae_precision_of(self.model)

    @vae_precision.setter
    def vae_precision(self, precision: str) -> None:
        from ..models.offload import set_vae_precision

        set_vae_precision(self.model, precision)

    @property
    def info(self) -> ModelInfo:
        """What the infotext and the API record about the model. With a separate VAE file, A1111's
        "VAE hash" (sha256, 10 hex digits of a file; read once, then cached) and "VAE" (its file name)."""
        m = self.model
        vae_path = getattr(m, "vae_path", None)
        return ModelInfo(
            name=m.name,
            path=str(m.path),
            family=m.spec.family.value,
            prediction=m.spec.prediction,
            short_hash=m.short_hash,
            vae_name=Path(vae_path).name if vae_path else None,
            vae_hash=getattr(m, "vae_hash", None) if vae_path and Path(vae_path).is_file() else None,
            edit_model=m.spec.is_edit,
            text_widths=_text_widths(m),
        )

    def generate(
        self,
        params: GenerationParams,
        *,
        progress: Callable[[Progress], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> Result:
        """Run a request: ``n_iter`` batches of ``batch_size`` images.

        A GPU out-of-memory error that the VAE's tiled retry does not absorb (the sampling loop,
        prompt encoding) makes the engine move down a memory mode (``--vram`` high → medium → low,
        as far as the speed switches allow: :func:`lower_vram_mode`) and run the request again from
        the start; the engine stays in that mode, and a warning says so. Where no lower mode is left
        (or on the CPU, where there is nothing to offload to), the request ends as
        :class:`~underpaint.errors.OutOfMemory`, after every offloaded block is back home and the
        cache is freed, so the next request can run.
        """
        from ..models.offload import free_cache, is_out_of_memory, place, settle
        from .generate import generate

        cancel = cancel or Cancellation()
        refiner = self.refiner_model(params.refiner.checkpoint) if params.refiner is not None else None
        if refiner is None and (params.hires is None or params.hires.checkpoint is None) and self._refiner is not None:
            self._refiner = None  # a request without a second checkpoint lets the kept one go (its memory with it)
            free_cache()
        hires_model = None
        if params.hires is not None and params.hires.checkpoint is not None:  # A1111's Hires checkpoint
            from dataclasses import replace

            hires_model = self.refiner_model(params.hires.checkpoint)
            params = params.replace(hires=replace(params.hires, checkpoint_title=hires_model.short_title))
        while True:
            try:
                return generate(self.model, params, info=self.info, progress=progress, cancel=cancel,
                                refiner=refiner, hires_model=hires_model, load=self.refiner_model)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are translated
                if not is_out_of_memory(exc):
                    raise
            # Outside the except block, so the failed call's frames (and their tensors) are gone.
            settle(self.model)
            free_cache()
            lower = lower_vram_mode(self.model)
            if lower is None:
                raise out_of_memory_error(self.model, params)
            log.warning("the GPU ran out of memory; switching to --vram %s and running the request again", lower)
            place(self.model, lower, device=self.model.device)
            free_cache()

    def img2img(self, image: "Image | str | Path", **fields: Any) -> Result:
        """Convenience: ``engine.img2img(image, prompt=..., strength=...)``.

        ``image`` is a PIL image or the path of an image file. ``fields`` are
        :class:`GenerationParams` fields, or A1111's API names for them (``denoising_strength``,
        ``sampler_name``, ``eta``, ...; :func:`~underpaint.params.request_fields`); fields not
        given take the model family's defaults. The :class:`Result` holds PIL images and, for each,
        its infotext and seed.
        """
        return self.generate(GenerationParams(init_images=(_picture(image),), **self._defaults(fields)))

    def txt2img(self, **fields: Any) -> Result:
        """Convenience: ``engine.txt2img(prompt=..., width=..., height=...)``; ``fields`` as for
        :meth:`img2img`."""
        return self.generate(GenerationParams(**self._defaults(fields)))

    def upscale(self, image: "Image | str | Path", upscaler: str = "Lanczos", scale: float = 4.0) -> "Image":
        """A picture enlarged by ``scale`` with ``upscaler`` (Lanczos, Nearest, or an upscaling model
        in the models folder by name, e.g. "4x-UltraSharp" or "R-ESRGAN 4x+"), as A1111's Extras tab
        does it (:func:`underpaint.pipeline.upscale.upscale_by`); a model runs on this engine's device."""
        from ..errors import InvalidParameter
        from . import upscale

        image = _picture(image)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 8:
            raise InvalidParameter("scale", scale, "a factor above 0 and at most 8")
        found = upscale.resolve_upscaler(self.models_dir, upscaler, "upscaler")
        return upscale.upscale(image.convert("RGB"), found, float(scale), str(self.model.device))

    def _defaults(self, fields: dict) -> dict:
        """The fields given (A1111's names renamed), over the model family's defaults (FLUX: Euler,
        Simple, CFG 1, ...)."""
        from ..params import request_fields
        from .flux import family_defaults

        return {**family_defaults(self.model), **request_fields(fields)}


def _picture(image: "Image | str | Path") -> "Image":
    """A PIL image as given, or read from the path given."""
    from os import PathLike

    from ..errors import InvalidParameter
    from ..imageio.load import load_image

    if isinstance(image, (str, PathLike)):
        return load_image(image)
    if not hasattr(image, "size"):
        raise InvalidParameter("image", type(image).__name__, "a PIL image or the path of an image file")
    return image


#: The memory modes below each one, in the order an out-of-memory error tries them.
_LOWER_MODES = {"high": ("medium", "low"), "medium": ("low",), "low": ()}


def lower_vram_mode(model: "LoadedModel") -> str | None:
    """The memory mode to fall back to after running out of GPU memory: the next one down that the
    model's speed switches allow (``fused_qkv`` needs high, ``compile`` not low); None at low, when
    none is allowed, and on the CPU, where the weights have nowhere else to rest."""
    import torch

    from ..models.optimize import speed_of

    if torch.device(model.device).type == "cpu":
        return None
    plan = getattr(model, "offload", None)
    speed = speed_of(model)
    return next((mode for mode in _LOWER_MODES[plan.mode if plan is not None else "high"]
                 if _allowed(model, speed, mode)), None)


def _allowed(model: "LoadedModel", speed: "SpeedOptions", mode: str) -> bool:
    """Whether the speed switches ``speed`` may run on ``model``'s device in memory mode ``mode``."""
    from ..errors import InvalidParameter
    from ..models.optimize import check

    try:
        check(speed, device=model.device, vram=mode)
    except InvalidParameter:
        return False
    return True


def out_of_memory_error(model: "LoadedModel", params: GenerationParams) -> "OutOfMemory":
    """The one-line error for a request the GPU had no room for: its size, batch and what to try."""
    from ..errors import OutOfMemory
    from ..imageio.resize import output_size
    from .generate import requested_size

    if params.is_img2img:
        width, height = output_size(params.init_images[0].size, params.width, params.height)
    else:
        width, height = requested_size(model, params)
    plan = getattr(model, "offload", None)
    below = _LOWER_MODES[plan.mode if plan is not None else "high"]
    hint = "try "
    if below:
        hint = f"try --vram {' or '.join(below)}, "
        blocking = _switches_refusing(model, below)
        if blocking:  # the engine could not move down by itself: say what stands in the way
            hint = f"try --vram {' or '.join(below)} without --optimize {','.join(blocking)}, "
    return OutOfMemory(f"the GPU ran out of memory at {width}x{height}, batch {params.batch_size}: "
                       f"{hint}a smaller size or batch")


def _switches_refusing(model: "LoadedModel", modes: tuple[str, ...]) -> list[str]:
    """The speed switches on ``model`` without which one of ``modes`` would be allowed (empty when
    some mode is allowed as it is)."""
    from dataclasses import replace

    from ..models.optimize import speed_of

    speed = speed_of(model)
    if any(_allowed(model, speed, mode) for mode in modes):
        return []
    return [name for name in speed.names
            if any(_allowed(model, replace(speed, **{name: False}), mode) for mode in modes)]


#: What each FLUX companion file is called in the models folder, as people download them.
_COMPANIONS = {"clip_l": ("text_encoders", ("clip_l",)), "t5": ("text_encoders", ("t5",)),
               "vae": ("vae", ("ae", "flux"))}


def _flux_companions(path: Path, folder, *, given: dict) -> dict[str, Path]:
    """The CLIP-L, T5 and autoencoder files a FLUX transformer file lacks, when the models folder has
    exactly one candidate for each (``clip_l*``, ``t5*`` in text_encoders/, ``ae*``/``flux*`` in vae/).

    Two or more candidates are an error that lists them and names the flag, rather than a guess
    between, say, an fp16 and an fp8 T5.
    """
    from ..models.flux_loader import components_needed

    found: dict[str, Path] = {}
    for part in components_needed(path):
        if given.get(part) is not None:
            continue
        kind, stems = _COMPANIONS[part]
        entries = folder.list_text_encoders() if kind == "text_encoders" else folder.list_vaes()
        matches = [e for e in entries if Path(e.filename).name.lower().startswith(stems)]
        if len(matches) == 1:
            found[part] = Path(matches[0].path)
        elif matches:
            from ..errors import ModelError

            flag = {"clip_l": "--clip-l", "t5": "--t5", "vae": "--vae"}[part]
            names = ", ".join(e.filename for e in matches)
            raise ModelError(f"{path.name} needs a separate {part} file and the models folder has several "
                             f"({names}): pass {flag} NAME to choose", field=part)
    return found


def _text_widths(model: "LoadedModel") -> tuple[int, ...]:
    """The token-embedding width of each text encoder of an SD model (FLUX: ())."""
    from .flux import is_flux

    if is_flux(model):
        return ()
    return tuple(int(t.config.hidden_size) for t in getattr(model, "text_encoders", ()))
