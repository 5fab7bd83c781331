"""The engine: a loaded checkpoint plus ``generate(params)``, the one path every request takes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..params import GenerationParams
from .records import Cancellation, ModelInfo, Progress, Result

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..models.loader import LoadedModel


class Engine:
    """Holds one checkpoint on its device and turns :class:`GenerationParams` into images.

    >>> engine = Engine.load("v1-5-pruned-emaonly.safetensors")      # doctest: +SKIP
    >>> result = engine.img2img(photo, prompt="oil painting", strength=0.6, seed=1234)  # doctest: +SKIP
    >>> result.images[0].save("painting.png")                          # doctest: +SKIP
    """

    def __init__(self, model: "LoadedModel", *, models_dir: Any = None):
        self.model = model
        self.models_dir = models_dir
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
    ) -> "Engine":
        """Load a checkpoint by path or by name from the models folder; never touches the network."""
        from ..models.device import pick_placement
        from ..models.loader import load_model
        from ..models.registry import ModelsDir, default_models_dir

        folder = ModelsDir(Path(models_dir) if models_dir else default_models_dir())
        path = folder.resolve_checkpoint(str(model))
        vae_path = folder.resolve_vae(str(vae)) if vae else None
        placement = pick_placement(device, dtype)
        loaded = load_model(path, device=placement.device, dtype=placement.dtype, vae=vae_path, prediction=prediction)
        return cls(loaded, models_dir=folder)

    @property
    def info(self) -> ModelInfo:
        m = self.model
        vae_path = getattr(m, "vae_path", None)
        return ModelInfo(
            name=m.name,
            path=str(m.path),
            family=m.spec.family.value,
            prediction=m.spec.prediction,
            short_hash=m.short_hash,
            vae_name=Path(vae_path).stem if vae_path else None,
        )

    def generate(
        self,
        params: GenerationParams,
        *,
        progress: Callable[[Progress], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> Result:
        """Run a request: ``n_iter`` batches of ``batch_size`` images."""
        from .generate import generate

        return generate(self.model, params, info=self.info, progress=progress, cancel=cancel or Cancellation())

    def img2img(self, image: "Image | str | Path", **fields: Any) -> Result:
        """Convenience: ``engine.img2img(image, prompt=..., strength=...)``."""
        from ..imageio.load import load_image

        if not hasattr(image, "size"):
            image = load_image(image)
        return self.generate(GenerationParams(init_images=(image,), **fields))

    def txt2img(self, **fields: Any) -> Result:
        return self.generate(GenerationParams(**fields))
