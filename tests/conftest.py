"""Shared fixtures: an empty, offline hub cache and tiny checkpoints in the real file layouts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: prove that nothing needs the network or a hub cache.
_HOME = Path(tempfile.mkdtemp(prefix="underpaint-test-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_HOME / "hf")
os.environ["XDG_CACHE_HOME"] = str(_HOME / "cache")
os.environ.setdefault("UNDERPAINT_MODELS_DIR", str(_HOME / "models"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def sd1_file(tiny_dir) -> Path:
    from tiny_models import write_sd1

    path = tiny_dir / "tiny-sd1.safetensors"
    if not path.exists():
        write_sd1(path)
    return path


@pytest.fixture(scope="session")
def sd2v_file(tiny_dir) -> Path:
    from tiny_models import write_sd2

    path = tiny_dir / "tiny-sd2v.safetensors"
    if not path.exists():
        write_sd2(path, prediction="v")
    return path


@pytest.fixture(scope="session")
def sdxl_file(tiny_dir) -> Path:
    from tiny_models import write_sdxl

    path = tiny_dir / "tiny-sdxl.safetensors"
    if not path.exists():
        write_sdxl(path)
    return path


@pytest.fixture(scope="session")
def sd1_engine(sd1_file):
    from underpaint.pipeline.engine import Engine

    return Engine.load(sd1_file, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def photo():
    """A small deterministic RGB picture with structure (gradients and a disc)."""
    import numpy as np
    from PIL import Image

    h, w = 64, 96
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 255 / (w - 1)).astype(np.uint8)
    g = (yy * 255 / (h - 1)).astype(np.uint8)
    b = (((xx - 48) ** 2 + (yy - 32) ** 2) < 18**2).astype(np.uint8) * 220
    return Image.fromarray(np.stack([r, g, b], -1), "RGB")


@pytest.fixture()
def api(tmp_path):
    """The A1111 API app over a stand-in engine that records each request's GenerationParams:
    (client, backend), backend.params in order (test_server_support.fake_api)."""
    from test_server_support import fake_api

    with fake_api(tmp_path) as (client, backend):
        yield client, backend
