"""The one loaded engine of a server, switched between checkpoints by jobs on the queue.

Only the queue's worker thread calls the methods that load or use the engine, so loading a
model and generating never overlap; other threads read the plain attributes (``loaded``,
``selected``, ``info``) to answer /options and /progress.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound
from ..pipeline.records import ModelInfo

#: Loads a checkpoint file; ``Engine.load`` with the server's device and dtype in production.
EngineLoader = Callable[[Path], Any]


class EngineSlot:
    """Holds at most one engine; ``selected`` is the checkpoint /options names, ``loaded`` the one in memory."""

    def __init__(self, loader: EngineLoader, default: Callable[[], Path | None]):
        self._loader = loader
        self._default = default
        self.engine: Any = None
        self.loaded: Path | None = None
        self.selected: Path | None = None
        self.info: ModelInfo | None = None

    def wanted(self, model: Path | None = None) -> Path:
        path = model or self.selected or self._default()
        if path is None:
            raise ModelNotFound("no checkpoint to load: put a .safetensors file in the models folder "
                                "or start the server with --model", field="sd_model_checkpoint")
        return path

    def engine_for(self, model: Path | None = None) -> Any:
        """The engine for ``model`` (default: the selected one), loading it if another is in memory."""
        path = self.wanted(model)
        if self.engine is None or self.loaded != path:
            self.unload()
            self.engine = self._loader(path)
            self.loaded = path
            self.info = self.engine.info
        return self.engine

    def select(self, model: Path) -> None:
        """Load ``model`` and make it the default for later jobs (A1111's sd_model_checkpoint option)."""
        self.engine_for(model)
        self.selected = model

    def unload(self) -> None:
        """Drop the engine and give its memory back (A1111's /unload-checkpoint)."""
        if self.engine is None:
            return
        self.engine = None
        self.loaded = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload(self) -> None:
        """Load the selected (or last) checkpoint again (A1111's /reload-checkpoint)."""
        path = self.loaded or self.wanted()
        self.unload()
        self.engine_for(path)
