"""Server settings as frozen records: where to listen, who may call, how much a request may ask for.

Every default is the safe one: loopback only, no CORS, uploads and workloads bounded, image
URLs refused. Loosening any of them is an explicit flag.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidParameter, UnderpaintError
from ..models.modes import VAE_PRECISIONS, VRAM_MODES, spoken

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each refusal is a 4xx naming the field and the limit.

    The text and picture limits are far beyond what A1111 users send (a long prompt is a few
    thousand characters, a request a handful of pictures); they stop a single request from
    holding the engine or the memory for hours, e.g. a megabyte prompt that is encoded once per
    step by prompt alternation, or thousands of small PNGs that each decode to 4096 x 4096.
    """

    max_body_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 150
    max_width: int = 4096
    max_height: int = 4096
    max_batch_size: int = 8
    max_images: int = 64  # batch_size * n_iter
    #: Characters in one prompt (prompt, negative_prompt, hr_prompt, hr_negative_prompt), also
    #: after the request's styles are applied: about 100 of CLIP's 75-token chunks.
    max_prompt_chars: int = 32768
    #: Names in a request's ``styles``.
    max_styles: int = 32
    #: ``<lora:...>``/``<lyco:...>``/``<hypernet:...>`` tags in a prompt (each LoRA is merged into the weights,
    #: each hypernetwork runs in the attention layers).
    max_lora_tags: int = 32
    #: ``AND`` parts of a prompt (Composable Diffusion): each is one more UNet input per picture and step.
    max_prompt_parts: int = 16
    #: Pictures decoded from one request: init images, mask, ControlNet unit images and masks,
    #: /controlnet/detect inputs (counted before decoding; each may have up to max_image_pixels).
    max_input_images: int = 16
    #: Values in a JSON body (counted as its commas, objects and arrays outside strings; see
    #: security.JSONValueLimitRoute): what the body limit's bytes may turn into once parsed.
    max_json_values: int = 100_000
    #: Tiles one SD upscale request repaints (tiles of one picture times n_iter): each is an img2img
    #: of its own, so small tiles over a large picture would hold the engine for hours.
    max_sd_upscale_tiles: int = 256
    #: Pixels of decoded pictures that all waiting and running requests may hold together (the
    #: server's picture budget, images.PictureLedger): 2^28 is one request of max_input_images
    #: pictures of max_image_pixels each, about 0.8 GB as RGB.
    max_held_pixels: int = 2**28


@dataclass(frozen=True)
class Credential:
    """One ``user:password`` pair for HTTP Basic."""

    user: str
    password: str

    def __repr__(self) -> str:  # never print a password in a traceback or a log
        return f"Credential(user={self.user!r}, password=***)"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``underpaint serve`` needs; built by the CLI, or directly in Python."""

    models_dir: Path | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    #: GPU memory mode for loaded checkpoints: high, medium or low (models/offload.py).
    vram: str = "high"
    #: Speed switches for loaded checkpoints (``--optimize``, ``--attention``; models/optimize.py).
    optimize: str = ""
    attention: str = "auto"
    #: The dtype of loaded checkpoints' VAE calls (``--vae-precision``: auto, fp32, fp16, bf16; models/offload.py).
    vae_precision: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: tuple[Credential, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 16
    allow_image_urls: bool = False
    insecure: bool = False
    preload: bool = True  # load the model at startup, as A1111 does, rather than on the first request
    webui: bool = True  # serve the browser UI at /
    #: Host header values accepted; empty means "loopback names when bound to loopback, anything otherwise".
    allowed_hosts: tuple[str, ...] = ()
    #: Where ``save_images`` requests write (``txt2img-images/``, ``img2img-images/``); None: ``outputs/``
    #: beside the models folder (underpaint/locations.py). Only this setting chooses it, never a request.
    outdir: Path | None = None
    #: A1111's ``styles.csv`` for ``styles`` in requests and ``/prompt-styles``; None: ``styles.csv``
    #: beside the models folder, used when it exists.
    styles_file: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidParameter("port", self.port, "a TCP port from 0 to 65535")
        if self.queue_size < 0:
            raise InvalidParameter("queue_size", self.queue_size, "0 or more waiting jobs")
        if self.vram not in VRAM_MODES:
            raise InvalidParameter("vram", self.vram, spoken(VRAM_MODES))
        from ..models.optimize import SpeedOptions

        SpeedOptions.parse(self.optimize, attention=self.attention)  # names checked at start, not at first load
        if self.vae_precision not in VAE_PRECISIONS:  # the device is checked at load
            raise InvalidParameter("vae_precision", self.vae_precision, spoken(VAE_PRECISIONS))
        outdir = Path(self.outdir).expanduser() if self.outdir is not None else None
        if outdir is not None and outdir.exists() and not outdir.is_dir():
            raise InvalidParameter("outdir", str(self.outdir), "a folder (or a path where one can be made)")
        if self.styles_file is not None and not Path(self.styles_file).expanduser().is_file():
            raise InvalidParameter("styles_file", str(self.styles_file), "an existing styles.csv file")

    @property
    def resolved_outdir(self) -> Path:
        """``outdir``, else ``outputs/`` beside the models folder."""
        from ..locations import default_outdir

        if self.outdir is not None:
            return Path(self.outdir).expanduser()
        return default_outdir(self.models_dir)

    @property
    def resolved_styles_file(self) -> Path:
        """``styles_file``, else ``styles.csv`` beside the models folder."""
        from ..locations import default_styles_file

        if self.styles_file is not None:
            return Path(self.styles_file).expanduser()
        return default_styles_file(self.models_dir)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def check_exposure(self) -> None:
        """Refuse to serve beyond this machine without a password, unless told it is on purpose."""
        if self.is_loopback or self.api_auth or self.insecure:
            return
        raise UnderpaintError(
            f"refusing to listen on {self.host} without --api-auth: anyone on the network could use this "
            "machine's GPU and read its models; add --api-auth user:password, or --insecure if that is intended"
        )


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_api_auth(text: str) -> tuple[Credential, ...]:
    """``user:pass[,user2:pass2]`` (A1111's --api-auth syntax); the password may contain ':'."""
    credentials = []
    for item in text.split(","):
        item = item.strip()
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            shown = f"{user}:***" if sep else "***"  # never echo what may be a password
            raise InvalidParameter("api_auth", shown, "user:password pairs separated by commas")
        credentials.append(Credential(user, password))
    return tuple(credentials)
