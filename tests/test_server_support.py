"""Shared pieces for the server tests: a scriptable fake engine, a models folder, a live uvicorn.

The fake engine keeps the real ``Engine.generate`` contract (params in; progress, cancel; a
``Result`` out) so the queue, cancel and error paths are tested fast and deterministically;
the wire against a real engine is in ``test_server_webuiapi.py``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from underpaint.pipeline.records import Cancellation, ModelInfo, Progress, Result


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the server recognises by name."""


@dataclass
class FakeBackend:
    """Loads :class:`FakeEngine` s and records what every engine was asked to do, in order."""

    step_delay: float = 0.0
    scripted: bool = True  # prompts "raise" and "oom" make generate() fail
    loads: list[Path] = field(default_factory=list)
    vaes: list[Path | None] = field(default_factory=list)  # the VAE file of each load (None: the checkpoint's)
    calls: list[str] = field(default_factory=list)  # prompts, in the order generate() started them
    params: list = field(default_factory=list)  # the GenerationParams of each generate(), likewise
    gate: threading.Event | None = None  # when set up, generate() waits for it before sampling
    started: threading.Event = field(default_factory=threading.Event)

    def __call__(self, path: Path, vae: Path | None = None) -> "FakeEngine":
        self.loads.append(Path(path))
        self.vaes.append(vae)
        return FakeEngine(Path(path), self, vae)


class FakeEngine:
    def __init__(self, path: Path, backend: FakeBackend, vae: Path | None = None):
        self.path = path
        self.backend = backend
        self.vae = vae

    @property
    def info(self) -> ModelInfo:
        """As the real engine's: a separate VAE file is recorded by file name and sha256 (10 digits)."""
        import hashlib

        vae_hash = hashlib.sha256(self.vae.read_bytes()).hexdigest()[:10] if self.vae else None
        return ModelInfo(name=self.path.stem, path=str(self.path), family="sd1", prediction="eps",
                         short_hash="0123456789", vae_name=self.vae.name if self.vae else None, vae_hash=vae_hash)

    def generate(self, params, *, progress=None, cancel: Cancellation | None = None) -> Result:
        from underpaint.pipeline.infotext import build_infotext

        b = self.backend
        b.calls.append(params.prompt)
        b.params.append(params)
        b.started.set()
        if b.scripted and params.prompt == "raise":
            raise RuntimeError("the fake engine was told to fail")
        if b.scripted and params.prompt == "oom":
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if b.gate is not None:
            b.gate.wait(30)
        cancel = cancel or Cancellation()
        params = params.with_seed()
        size = params.init_images[0].size if params.init_images else (params.width or 512, params.height or 512)
        if params.width and params.height:
            size = (params.width, params.height)
        images, seeds, subseeds, unfinished, interrupted = [], [], [], [], False
        for job in range(params.n_iter):
            stopped = False
            for step in range(params.steps):
                time.sleep(b.step_delay)
                if progress is not None:
                    color = (job * 40 % 256, step * 20 % 256, 100)
                    progress(Progress(job, params.n_iter, step + 1, params.steps,
                                      lambda c=color: [Image.new("RGB", size, c)]))
                if cancel.interrupted or cancel.skipped:
                    stopped = True
                    break
            cancel.clear_skip()
            for i in range(params.batch_size):  # a stopped batch is still returned, as A1111 does
                n = job * params.batch_size + i
                if stopped:
                    unfinished.append(len(images))
                images.append(Image.new("RGB", size, (n * 30 % 256, 0, 0)))
                seeds.append(params.seed + n)
                subseeds.append(params.subseed + n)
            if cancel.interrupted:
                interrupted = True
                break
        infotexts = tuple(build_infotext(params, self.info, width=size[0], height=size[1], seed=s, subseed=u)
                          for s, u in zip(seeds, subseeds))
        n = len(images)
        return Result(tuple(images), infotexts, tuple(seeds), tuple(subseeds), params, self.info,
                      interrupted=interrupted, prompts=(params.prompt,) * n, negative_prompts=(params.negative_prompt,) * n,
                      unfinished=tuple(unfinished))


def make_models_dir(root: Path, names=("alpha.safetensors", "beta.safetensors"), vaes=()) -> Path:
    """A models folder whose checkpoints (and VAE files, ``vaes``: paths in vae/) are placeholders
    (listing never reads them); each VAE file's bytes are its name, so each has its own hash."""
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "checkpoints" / name).write_bytes(b"placeholder")
    for name in vaes:
        (root / "vae" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "vae" / name).write_bytes(name.encode())
    return root


@contextlib.contextmanager
def fake_api(root: Path):
    """A test client of the app over placeholder checkpoints in ``root`` whose engine records each
    request's parameters instead of generating: yields (client, the :class:`FakeBackend`)."""
    from fastapi.testclient import TestClient

    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(root), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, backend


def tiny_models_dir(root: Path, sd1_file: Path) -> Path:
    """A models folder holding the tiny SD 1.5 checkpoint (copied), for servers that really generate."""
    import shutil

    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(sd1_file, root / "checkpoints" / "tiny-sd1.safetensors")
    return root


@contextlib.contextmanager
def real_api(models: Path):
    """A test client of the app over ``models`` with a real engine on the CPU in float32."""
    from fastapi.testclient import TestClient

    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    app = create_app(ServerConfig(models_dir=models, device="cpu", dtype="fp32"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, *, port: int | None = None):
    """Run ``app`` under a real uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def png_b64(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_b64(data: str) -> Image.Image:
    import base64
    import io

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image
