"""Session fixtures over the tiny FLUX files, for any test module: ``from flux_fixtures import flux_files, flux_dev``.

The files are written once per test session into one folder under pytest's base temp folder,
so every module that imports these fixtures shares them (:func:`tiny_flux.tiny_flux_set` reuses
a complete set).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_flux import tiny_flux_set


@pytest.fixture(scope="session")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    """Paths of every tiny FLUX file (see :func:`tiny_flux.tiny_flux_set` for the keys)."""
    return tiny_flux_set(tmp_path_factory.getbasetemp() / "tiny-flux")


@pytest.fixture(scope="session")
def flux_dev(flux_files):
    """The tiny dev transformer with separate CLIP-L, T5 and ae files, loaded in float32 on the CPU."""
    from underpaint.models.loader import load_flux

    return load_flux(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_files["t5"],
                     vae=flux_files["ae"], dtype=torch.float32)
