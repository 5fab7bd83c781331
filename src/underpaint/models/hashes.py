"""File hashes as A1111 writes them into infotext, cached so a 7 GB file is hashed once.

- "Model hash" (and "VAE hash"): the first 10 hex digits of the whole file's sha256.
- LoRA "addnet" hash (``Lora hashes``): sha256 of a safetensors file's tensor bytes only,
  i.e. everything after the 8-byte length and the JSON header, first 12 hex digits. Editing
  the metadata leaves it unchanged.

The cache is a small JSON file (``$XDG_CACHE_HOME/underpaint/hashes.json`` by default) keyed by
absolute path and checked against the file's size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ModelError
from .header import safetensors_body_offset

_CHUNK = 1 << 20


def hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "underpaint" / "hashes.json"


def sha256_of(path: str | os.PathLike, *, start: int = 0) -> str:
    """sha256 of the file's bytes from ``start`` on, read in 1 MiB chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read for hashing ({exc.strerror or exc})") from None
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str:
    """The full sha256 of a file (A1111 shows it as the model's 'sha256'), cached."""
    return _cached(Path(path), "sha256", lambda p: sha256_of(p), cache)


def model_hash(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str:
    """A1111's 'Model hash': the first 10 hex digits of the file's sha256."""
    return file_sha256(path, cache=cache)[:10]


def addnet_hash(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str:
    """The LoRA 'addnet' hash: sha256 of the safetensors body after the header, 12 hex digits."""
    return _cached(Path(path), "addnet", lambda p: sha256_of(p, start=safetensors_body_offset(p)), cache)[:12]


def cached_sha256(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str | None:
    """The file's full sha256 if it is already in the cache (never reads the file): for fast listings."""
    p = Path(path)
    entry = _load(Path(cache) if cache else hash_cache_path()).get(str(p.resolve()))
    if entry and entry.get("sha256") and _stamp(p) == (entry.get("size"), entry.get("mtime_ns")):
        return entry["sha256"]
    return None


def cached_model_hash(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str | None:
    """The model hash if it is already in the cache (never reads the file): for fast listings."""
    full = cached_sha256(path, cache=cache)
    return full[:10] if full else None


def _stamp(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _cached(p: Path, kind: str, compute, cache: str | os.PathLike | None) -> str:
    if not p.is_file():
        raise ModelError(f"{p}: no such file to hash")
    cache_path = Path(cache) if cache else hash_cache_path()
    key = str(p.resolve())
    size, mtime = _stamp(p)
    entries = _load(cache_path)
    entry = entries.get(key, {})
    if entry.get("size") == size and entry.get("mtime_ns") == mtime and entry.get(kind):
        return entry[kind]
    value = compute(p)
    if entry.get("size") != size or entry.get("mtime_ns") != mtime:
        entry = {"size": size, "mtime_ns": mtime}
    entry[kind] = value
    entries = _load(cache_path)  # re-read: another process may have added entries meanwhile
    entries[key] = entry
    _save(cache_path, entries)
    return value


def _load(cache_path: Path) -> dict:
    try:
        data = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(cache_path: Path, entries: dict) -> None:
    """Write atomically; an unwritable cache only costs a rehash next time."""
    from ..imageio.metadata import write_atomic

    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path, json.dumps(entries, indent=0, sort_keys=True).encode("utf-8"), overwrite=True)
    except OSError:
        pass
