"""The one loaded engine of a server, switched between checkpoints and VAEs by jobs on the queue.

Only the queue's worker thread calls the methods that load or use the engine, so loading a
model and generating never overlap; other threads read the plain attributes (``loaded``,
``selected``, ``vae``, ``info``) to answer /options and /progress. A VAE chosen through /options
or a request's ``override_settings`` is loaded the same way, when the next job on the worker
asks for the engine, never under a running job; with the same checkpoint only the VAE's weights
are read and swapped into the engine (``Engine.use_vae``).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound
from ..pipeline.records import ModelInfo

#: Loads a checkpoint file: ``loader(path)`` with the checkpoint's own VAE, ``loader(path, vae=file)``
#: with a separate VAE file; ``Engine.load`` with the server's device and dtype in production. (A
#: loader that takes only a path serves as long as no VAE file is chosen.)
EngineLoader = Callable[..., Any]
#: The VAE file for a checkpoint and a request's ``sd_vae`` override (None: the sd_vae option);
#: None: the checkpoint's own VAE.
VaeChooser = Callable[[Path, "str | None"], "Path | None"]


def _own_vae(checkpoint: Path, choice: str | None) -> Path | None:
    return None


class EngineSlot:
    """Holds at most one engine; ``selected`` is the checkpoint /options names, ``loaded`` the one in
    memory and ``vae`` the separate VAE file loaded with it (None: the checkpoint's own)."""

    def __init__(self, loader: EngineLoader, default: Callable[[], Path | None], vae_for: VaeChooser = _own_vae):
        self._loader = loader
        self._default = default
        self._vae_for = vae_for
        self.engine: Any = None
        self.loaded: Path | None = None
        self.vae: Path | None = None
        self.selected: Path | None = None
        self.info: ModelInfo | None = None

    def wanted(self, model: Path | None = None) -> Path:
        path = model or self.selected or self._default()
        if path is None:
            raise ModelNotFound("no checkpoint to load: put a .safetensors file in the models folder "
                                "or start the server with --model", field="sd_model_checkpoint")
        return path

    def engine_for(self, model: Path | None = None, vae: str | None = None) -> Any:
        """The engine for ``model`` (default: the selected one) with the VAE that ``vae`` (a request's
        sd_vae override; None: the sd_vae option) picks for it, loaded again when another checkpoint
        is in memory. When only the VAE differs, the engine's ``use_vae`` changes it in place,
        reading the VAE file (for "None": only the checkpoint's VAE tensors) and nothing else; an
        engine without ``use_vae``, or whose ``use_vae`` says the VAE does not fit the running one,
        is loaded again with it, exactly as ``Engine.load(path, vae=...)`` makes it. A VAE that
        fails to load leaves no engine, as a failed load does."""
        path = self.wanted(model)
        vae_path = self._vae_for(path, vae)
        if self.engine is not None and self.loaded == path and self.vae != vae_path and self._swap_vae(vae_path):
            self.vae = vae_path
            self.info = self.engine.info
        if self.engine is None or self.loaded != path or self.vae != vae_path:
            self.unload()
            self.engine = self._loader(path) if vae_path is None else self._loader(path, vae=vae_path)
            self.loaded = path
            self.vae = vae_path
            self.info = self.engine.info
        return self.engine

    def _swap_vae(self, vae_path: Path | None) -> bool:
        """Whether the loaded engine now runs with ``vae_path`` without a reload (see :meth:`engine_for`)."""
        use_vae = getattr(self.engine, "use_vae", None)
        if use_vae is None:
            return False
        try:
            return bool(use_vae(vae_path))
        except BaseException:
            self.unload()
            raise

    def select(self, model: Path, vae: str | None = None) -> None:
        """Load ``model`` and make it the default for later jobs (A1111's sd_model_checkpoint option);
        ``vae``: the sd_vae value to load it with, when the same /options call changes it."""
        self.engine_for(model, vae)
        self.selected = model

    def unload(self) -> None:
        """Drop the engine and give its memory back (A1111's /unload-checkpoint)."""
        if self.engine is None:
            return
        self.engine = None
        self.loaded = None
        self.vae = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload(self) -> None:
        """Load the selected (or last) checkpoint again, with the VAE the sd_vae option picks for it
        (A1111's /reload-checkpoint)."""
        path = self.loaded or self.wanted()
        self.unload()
        self.engine_for(path)
