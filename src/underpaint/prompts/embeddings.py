"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word") from the files people share.

Layouts A1111 1.10 reads, all reproduced here:

- A1111 ``.pt``: ``{"string_to_param": {"*": Tensor[n, D]}, "name": ..., "step": ...}``;
- ``.safetensors`` with one tensor (usually ``emb_params``), or SDXL's ``clip_l`` + ``clip_g``;
- diffusers ``.bin``: ``{"<token>": Tensor[D] or Tensor[n, D]}``.

The embedding is named after its file (A1111 ignores the name stored inside). Pickles are
opened with ``torch.load(weights_only=True)``: one that needs arbitrary code is refused.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError, ModelNotFound, UnsafeModelFile

#: File suffixes read as embeddings.
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare
class Embedding:
    """An embedding's vectors, one ``[n, D]`` float32 tensor per text encoder.

    SD1/SD2 files hold one tensor; SDXL files hold CLIP-L's then bigG's (``clip_l``, ``clip_g``).
    """

    name: str
    vectors: tuple[torch.Tensor, ...]

    @property
    def count(self) -> int:
        """Vectors per occurrence: how many prompt tokens the embedding occupies."""
        return int(self.vectors[0].shape[0])

    def fits(self, dims: tuple[int, ...]) -> bool:
        """True when there is one tensor per encoder, each of that encoder's width (A1111 skips the rest)."""
        return len(self.vectors) == len(dims) and all(v.shape[-1] == d for v, d in zip(self.vectors, dims))


def read_changed(cache: dict, path: Path, *, on_error=None) -> Embedding | None:
    """``path``'s embedding, read again only when its size or modification time changed since ``cache``
    (path → ((size, mtime), embedding or None)) kept it; None for a file that cannot be read, with
    ``on_error(exc)`` told when it is read."""
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    cached = cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        embedding = load_embedding(path)
    except ModelError as exc:
        if on_error is not None:
            on_error(exc)
        embedding = None
    cache[path] = (stamp, embedding)
    return embedding


def load_embedding(path: str | Path) -> Embedding:
    """Read an embedding file; the name is the file name without its suffix."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"embedding file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        data = _read_safetensors(path)
    elif suffix in (".pt", ".bin"):
        data = _read_pickle(path)
    else:
        raise ModelError(f"{path}: not an embedding file (expected one of {', '.join(EMBEDDING_SUFFIXES)})")
    return Embedding(path.stem, _vectors(data, path))


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable safetensors file ({exc})") from None


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise UnsafeModelFile(f"{path}: refusing a pickle that needs more than plain tensors to load") from None
        raise ModelError(f"{path}: unreadable embedding file ({_first_line(exc)})") from None
    except Exception as exc:  # a damaged file fails in many ways inside the unpickler
        raise ModelError(f"{path}: unreadable embedding file ({_first_line(exc)})") from None


def _vectors(data: object, path: Path) -> tuple[torch.Tensor, ...]:
    """The per-encoder tensors, trying the layouts in A1111's order."""
    if not isinstance(data, dict) or not data:
        raise ModelError(f"{path}: not an embedding (expected a dict of tensors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelError(f"{path}: expected exactly one entry in string_to_param")
        return (_as_matrix(next(iter(params.values())), path),)
    if "clip_l" in data and "clip_g" in data:
        return _as_matrix(data["clip_l"], path), _as_matrix(data["clip_g"], path)
    if len(data) != 1:
        raise ModelError(f"{path}: expected one tensor, or clip_l and clip_g; found {len(data)} entries")
    return (_as_matrix(next(iter(data.values())), path),)


def _as_matrix(value: object, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        raise ModelError(f"{path}: embedding vectors must be a non-empty 1-D or 2-D tensor")
    value = value.detach().to(device="cpu", dtype=torch.float32)
    return value.unsqueeze(0) if value.ndim == 1 else value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
