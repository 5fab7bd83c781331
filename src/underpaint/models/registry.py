"""The models folder: where checkpoints, VAEs, LoRAs, embeddings and ControlNets are found by name.

Two layouts are read. underpaint's own (``checkpoints/ vae/ loras/ embeddings/ controlnet/
VAE-approx/ upscale_models/ GFPGAN/ Codeformer/``) and an existing AUTOMATIC1111 install's (``models/Stable-diffusion``,
``models/VAE``, ``models/Lora``, ``embeddings/``, ``models/ControlNet``, ``models/VAE-approx``,
``models/ESRGAN``, ``models/RealESRGAN``, ``models/SwinIR``, ``models/DAT``, ``models/HAT``, ``models/ScuNET``,
``models/GFPGAN`` and ``models/Codeformer``),
given either the install's root or its ``models/`` folder, so people can point underpaint at the
files they already have. Names follow A1111: a checkpoint's name is its path relative to the checkpoints folder
without the extension, its title is the file name with the short hash in brackets when it is known.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound
from .hashes import cached_model_hash

log = logging.getLogger(__name__)
_warned_names: set[str] = set()


def listable(path: Path) -> bool:
    """Whether a model file's path is text. POSIX file names are bytes; a name that is not valid
    UTF-8 reaches Python with stand-in characters that no JSON answer, terminal or request can
    carry, so such a file is left out of every listing (with a warning, once, that says to rename
    it) instead of failing the listing."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if text not in _warned_names:
            _warned_names.add(text)
            log.warning("left out %s: its name is not valid UTF-8; rename the file to use it", ascii(text))
        return False
    return True

@dataclass(frozen=True)
class NamedFile:
    """A network file (LoRA, hypernetwork) in the models folder; ``name`` is the file name without suffix
    (A1111's name for it), ``relative`` its path relative to its folder, '/'-separated, without the suffix."""

    name: str
    path: Path
    relative: str


def list_named_files(folders, extensions: tuple[str, ...]) -> list[NamedFile]:
    """Every file with one of ``extensions`` under ``folders`` (recursively, hidden ones left out, the first
    folder's file winning a relative name), sorted by relative name."""
    seen: dict[str, NamedFile] = {}
    for base in folders:
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                path = Path(dirpath) / f
                if f.lower().endswith(extensions) and not f.startswith(".") and listable(path):
                    relative = path.relative_to(base).with_suffix("").as_posix()
                    seen.setdefault(relative, NamedFile(path.stem, path, relative))
    return sorted(seen.values(), key=lambda e: e.relative.lower())


@dataclass
class FileCache:
    """What was read from files, by path and ``key`` (read again when the file changes), the newest
    ``limit`` kept, the one used last newest."""

    limit: int = 8
    _entries: OrderedDict = field(default_factory=OrderedDict)

    def get(self, path: Path, load: Callable[[Path], Any], *, key: object = None) -> Any:
        """``load(path)``, or what it gave for this path and ``key`` while the file is unchanged."""
        path = Path(path)
        stat = path.stat()
        stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, key)
        found = self._entries.get(stamp)
        if found is None:
            found = load(path)
            self._entries[stamp] = found
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)
        self._entries.move_to_end(stamp)
        return found


def find_named_file(entries: list[NamedFile], name: str) -> Path | None:
    """The entry a tag names: by relative path first, then by file name (with or without its suffix)."""
    wanted = name.strip().replace("\\", "/")
    for matches in ([e for e in entries if e.relative == wanted],
                    [e for e in entries if e.name == wanted or e.path.name == wanted]):
        if matches:
            return matches[0].path
    return None


CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".gguf")
VAE_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
#: FLUX.1's CLIP-L and T5 files (and T5's spiece.model beside them).
TEXT_ENCODER_EXTENSIONS = (".safetensors", ".gguf")  # GGUF: T5 encoders in llama.cpp's layout
#: Upscaling models: A1111's and ComfyUI's .pth files (read with weights_only), or safetensors.
UPSCALER_EXTENSIONS = (".pth", ".pt", ".safetensors")

# kind → (underpaint folder, A1111 folders relative to an A1111 root)
_FOLDERS = {
    "checkpoints": ("checkpoints", ("models/Stable-diffusion",)),
    "vae": ("vae", ("models/VAE",)),
    "loras": ("loras", ("models/Lora", "models/LyCORIS")),
    "embeddings": ("embeddings", ("embeddings",)),
    "hypernetworks": ("hypernetworks", ("models/hypernetworks",)),
    "controlnet": ("controlnet", ("models/ControlNet", "models/ipadapter")),
    # IP-Adapter's CLIP vision encoders (ComfyUI's folder name; A1111's ControlNet extension keeps them in
    # its annotator downloads).
    "clip_vision": ("clip_vision", ("models/clip_vision", "extensions/sd-webui-controlnet/annotator/downloads/"
                                                          "clip_vision")),
    "text_encoders": ("text_encoders", ("models/text_encoder",)),
    # Tiny preview decoders (TAESD); A1111 keeps them in models/VAE-approx.
    "vae_approx": ("VAE-approx", ("models/VAE-approx",)),
    # Upscaling models (ESRGAN, Real-ESRGAN, SwinIR, ...): ComfyUI's folder name; A1111 keeps them by kind.
    "upscalers": ("upscale_models", ("models/ESRGAN", "models/RealESRGAN", "models/SwinIR", "models/DAT",
                                     "models/HAT", "models/ScuNET")),
    # Face restoration (GFPGAN) with its face detector and parser, where A1111 keeps them.
    "gfpgan": ("GFPGAN", ("models/GFPGAN",)),
    # ADetailer's detection models (ultralytics YOLO files: face_yolov8n.pt, hand_yolov8n.pt, ...).
    "adetailer": ("adetailer", ("models/adetailer",)),
    "codeformer": ("Codeformer", ("models/Codeformer",)),
    # "Interrogate CLIP": the BLIP captioner, a CLIP model, and the word lists (an A1111 install's interrogate/).
    "blip": ("BLIP", ("models/BLIP",)),
    "clip": ("CLIP", ("models/CLIP",)),
    "interrogate": ("interrogate", ("interrogate",)),
    # "Interrogate DeepBooru": DeepDanbooru's tagger (model-resnet_custom_v3.pt), where A1111 keeps it.
    "deepbooru": ("torch_deepdanbooru", ("models/torch_deepdanbooru",)),
}

_HASH_AT_END = re.compile(r"\[([0-9a-fA-F]+)\]\Z")


def split_hash(title: str, digits: tuple[int, int] = (8, 64)) -> tuple[str, str | None]:
    """A1111's ``name [hash]`` title as (name, hash), the hash ``digits`` hex digits long; (title, None)
    without one. (Found from the end: no backtracking over long runs of spaces.)"""
    found = _HASH_AT_END.search(title)
    if found is None or not digits[0] <= len(found.group(1)) <= digits[1] or "\n" in title[:found.start()]:
        return title, None
    return title[:found.start()].rstrip(), found.group(1)


def default_models_dir() -> Path:
    """``$UNDERPAINT_MODELS_DIR``, else ``$XDG_DATA_HOME/underpaint/models`` (``~/.local/share/...``)."""
    env = os.environ.get("UNDERPAINT_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "underpaint" / "models"


@dataclass(frozen=True)
class CheckpointEntry:
    #: Path relative to its folder without the extension, '/'-separated: A1111's model name
    #: (what infotext writes as ``Model:``), e.g. ``sub/dreamy``.
    name: str
    path: Path
    #: A1111's title: the file name with extension, plus ``[short hash]`` when the hash is cached.
    title: str
    #: Path relative to its folder with the extension (``sub/dreamy.ckpt``); a diffusers folder's own name.
    filename: str = ""
    #: First 10 hex digits of the sha256 when already cached (listing never hashes).
    short_hash: str | None = None

    @property
    def model_name(self) -> str:
        return self.name


@dataclass(frozen=True)
class ModelsDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    def _a1111_root(self) -> Path | None:
        """The A1111 install root when ``root`` is one (or is its ``models/`` folder)."""
        if (self.root / "models" / "Stable-diffusion").is_dir():
            return self.root
        if (self.root / "Stable-diffusion").is_dir() and self.root.name == "models":
            return self.root.parent
        return None

    def folders(self, kind: str) -> tuple[Path, ...]:
        """Existing folders of ``kind`` (checkpoints, vae, loras, embeddings, controlnet, ...), own layout first."""
        own, a1111 = _FOLDERS[kind]
        candidates = [self.root / own]
        a_root = self._a1111_root()
        if a_root is not None:
            candidates += [a_root / rel for rel in a1111]
        found: dict[Path, Path] = {}
        for p in candidates:  # in an A1111 root, its embeddings/ is also ours: list it once
            if p.is_dir():
                found.setdefault(p.resolve(), p)
        return tuple(found.values())

    def folder(self, kind: str) -> Path:
        """Where new files of ``kind`` go: the A1111 folder in an A1111 install, else underpaint's."""
        own, a1111 = _FOLDERS[kind]
        a_root = self._a1111_root()
        return a_root / a1111[0] if a_root is not None else self.root / own

    @property
    def checkpoints_dir(self) -> Path:
        return self.folder("checkpoints")

    @property
    def vae_dir(self) -> Path:
        return self.folder("vae")

    @property
    def loras_dir(self) -> Path:
        return self.folder("loras")

    @property
    def embeddings_dir(self) -> Path:
        return self.folder("embeddings")

    @property
    def controlnet_dir(self) -> Path:
        return self.folder("controlnet")

    @property
    def text_encoders_dir(self) -> Path:
        return self.folder("text_encoders")

    @property
    def upscalers_dir(self) -> Path:
        return self.folder("upscalers")

    @property
    def vae_approx_dir(self) -> Path:
        return self.folder("vae_approx")

    def find_vae_approx(self, name: str, part: str = "decoder") -> Path | None:
        """A tiny VAE's decoder (or ``part="encoder"``) by its base name (``taesd``, ``taesdxl``,
        ``taef1``), or None.

        Looked for in each VAE-approx folder as ``<name>_<part>.safetensors`` (madebyollin's
        files), then as a diffusers folder ``<name>/diffusion_pytorch_model.safetensors`` (both parts).
        Only safetensors: A1111's ``.pth`` files are pickles and are never read.
        """
        for base in self.folders("vae_approx"):
            for candidate in (base / f"{name}_{part}.safetensors",
                              base / name / "diffusion_pytorch_model.safetensors"):
                if candidate.is_file():
                    return candidate
        return None

    def list_checkpoints(self) -> list[CheckpointEntry]:
        """Checkpoint files and diffusers folders, sorted by name (hashes only from the cache)."""
        return self._entries("checkpoints", CHECKPOINT_EXTENSIONS, diffusers_folders=True)

    def list_vaes(self) -> list[CheckpointEntry]:
        return self._entries("vae", VAE_EXTENSIONS, diffusers_folders=False)

    def resolve_checkpoint(self, name_or_path: str | os.PathLike) -> Path:
        """A path as given, or a name (with or without extension, or an A1111 title/short hash)."""
        return self._resolve("checkpoint", name_or_path, self.list_checkpoints(), "checkpoints")

    def find_checkpoint(self, name: str, entries: list[CheckpointEntry] | None = None) -> Path | None:
        """The listed checkpoint ``name`` means (file name, name, stem, A1111 title or short hash),
        or None. Unlike :meth:`resolve_checkpoint` it never tries ``name`` as a path, so a name
        from an HTTP request never reaches the file system. ``entries``: a listing already made."""
        entry = match_entry(self.list_checkpoints() if entries is None else entries, str(name))
        return entry.path if entry is not None else None

    def resolve_vae(self, name_or_path: str | os.PathLike) -> Path:
        return self._resolve("VAE", name_or_path, self.list_vaes(), "vae")

    def list_text_encoders(self) -> list[CheckpointEntry]:
        """Single-file text encoders for FLUX.1 (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``,
        ``t5-v1_1-xxl-encoder-Q8_0.gguf``, ...)."""
        return self._entries("text_encoders", TEXT_ENCODER_EXTENSIONS, diffusers_folders=False)

    def list_upscalers(self) -> list[CheckpointEntry]:
        """Upscaling model files (``4x-UltraSharp.pth``, ``RealESRGAN_x4plus.pth``, ...), named by
        their path without the extension; pipeline/upscale.py gives the Real-ESRGAN files A1111's names."""
        return self._entries("upscalers", UPSCALER_EXTENSIONS, diffusers_folders=False)

    def resolve_text_encoder(self, name_or_path: str | os.PathLike) -> Path:
        return self._resolve("text encoder", name_or_path, self.list_text_encoders(), "text_encoders")

    def _entries(self, kind: str, extensions: tuple[str, ...], *, diffusers_folders: bool) -> list[CheckpointEntry]:
        seen: dict[str, CheckpointEntry] = {}
        for base in self.folders(kind):
            for path in _walk(base, extensions, diffusers_folders):
                filename = path.relative_to(base).as_posix()
                if filename in seen:
                    continue
                name = filename if path.is_dir() else filename[: len(filename) - len(path.suffix)]
                short = None if path.is_dir() else cached_model_hash(path)
                title = f"{filename} [{short}]" if short else filename
                seen[filename] = CheckpointEntry(name, path, title, filename, short)
        return sorted(seen.values(), key=lambda e: e.filename.lower())

    def _resolve(self, what: str, name_or_path: str | os.PathLike, entries: list[CheckpointEntry], kind: str) -> Path:
        given = Path(name_or_path).expanduser()
        marker = "model_index.json" if kind == "checkpoints" else "config.json"  # diffusers model folders
        if given.is_file() or (given.is_dir() and (given / marker).is_file()):
            return given
        match = match_entry(entries, str(name_or_path))
        if match is not None:
            return match.path
        if given.is_dir():  # a folder that is there, but not a model: say so rather than "not found"
            raise ModelNotFound(f"{given}: a folder without {marker}, expected a {what} file or a diffusers "
                                f"folder", field=kind)
        raise ModelNotFound(self._not_found(what, str(name_or_path), entries, kind), field=kind)

    def _not_found(self, what: str, name: str, entries: list[CheckpointEntry], kind: str) -> str:
        where = self.folder(kind)
        if not entries:
            how = {"checkpoints": "run `underpaint download sd15` or put a .safetensors checkpoint in ",
                   "text_encoders": "put clip_l.safetensors and a T5 file (t5xxl_fp16.safetensors) in "}.get(
                kind, "put a .safetensors VAE in ")
            return f"{what} {name!r} not found: no {kind} in {where}; {how}{where}"
        names = [e.filename for e in entries]
        listed = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        return f"{what} {name!r} not found in {where}{did_you_mean(name, entries)} (available: {listed})"


def did_you_mean(name: str, entries: list[CheckpointEntry]) -> str:
    """"; did you mean 'a' or 'b'?" for the listed names (file names, then names) close to ``name``,
    or "" (also for a name over 256 characters: difflib's comparison is quadratic)."""
    if len(name) > 256:
        return ""
    close = difflib.get_close_matches(name, [e.filename for e in entries] + [e.name for e in entries], n=3,
                                      cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in dict.fromkeys(close))}?" if close else ""


def _walk(base: Path, extensions: tuple[str, ...], diffusers_folders: bool):
    """Model files under ``base`` (recursively, as A1111 does) and diffusers folders (not entered)."""
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        here = Path(dirpath)
        if diffusers_folders:
            for d in list(dirnames):
                if (here / d / "model_index.json").is_file() and listable(here / d):
                    dirnames.remove(d)
                    yield here / d
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.lower().endswith(extensions) and not f.startswith(".") and listable(here / f):
                yield here / f


def match_entry(entries: list[CheckpointEntry], name: str) -> CheckpointEntry | None:
    """The listed entry ``name`` means (file name, name, stem, A1111 title ``name [short hash]``
    or short hash, by :func:`_find`'s rules), or None; never tries ``name`` as a path. A name
    that fits several entries is a :class:`ModelNotFound`."""
    text = name.strip()
    wanted_hash = None
    text, found = split_hash(text)
    if found is not None:
        wanted_hash = found.lower()
    return _find(entries, text, wanted_hash)


def _find(entries: list[CheckpointEntry], text: str, wanted_hash: str | None) -> CheckpointEntry | None:
    """Exact name, then name without extension, then a unique file stem, then a cached short hash."""
    norm = text.replace("\\", "/")
    tiers = (
        [e for e in entries if e.filename == norm],
        [e for e in entries if e.name == norm],
        [e for e in entries if e.path.stem == norm or e.path.name == norm],
    )
    for found in tiers:
        if wanted_hash:
            found = [e for e in found if e.short_hash == wanted_hash] or found
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ModelNotFound(f"{text!r} is ambiguous: " + ", ".join(e.filename for e in found[:5])
                                + "; give the path relative to the models folder")
    if wanted_hash or re.fullmatch(r"[0-9a-fA-F]{10}", norm):
        h = (wanted_hash or norm).lower()
        by_hash = [e for e in entries if e.short_hash == h]
        if len(by_hash) == 1:
            return by_hash[0]
    return None
