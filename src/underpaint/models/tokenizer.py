"""CLIP tokenizers built offline from OpenAI's BPE merges file shipped with the package.

SD1, SD2 and SDXL all tokenize with OpenAI CLIP's byte-level BPE (49,408 tokens, 77 positions).
The original release ships only ``bpe_simple_vocab_16e6.txt.gz`` (a version line, then merges);
transformers' ``CLIPTokenizer`` reads a ``vocab.json``/``merges.txt`` pair. The pair is derived
from the merges exactly as OpenAI's ``SimpleTokenizer`` builds its encoder: the 256 byte
characters, the same with the end-of-word marker ``</w>``, each merge joined, then the two
special tokens. The files are written once into a cache folder and reused.

Padding differs by encoder (diffusers' configs and A1111 agree): OpenAI CLIP-L pads with
``<|endoftext|>``; the OpenCLIP encoders (SD2's ViT-H, SDXL's second, bigG) pad with ``!``,
token id 0.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import ModelError

VOCAB_SIZE = 49408
MAX_LENGTH = 77
#: Number of merge rules used by CLIP (49408 - 2*256 byte tokens - 2 specials).
NUM_MERGES = VOCAB_SIZE - 512 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = VOCAB_SIZE - 2
EOS_ID = VOCAB_SIZE - 1
#: Pad token of OpenAI CLIP-L (SD1, SDXL's first encoder).
PAD_EOS = EOS
#: Pad token of the OpenCLIP encoders (SD2, SDXL's second encoder): "!" is token 0.
PAD_BANG = "!"

_BPE_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters.

    Printable Latin-1 bytes stand for themselves; the remaining bytes (controls, space,
    soft hyphen, ...) are given the code points 256, 257, ... in byte order, so that BPE never
    sees whitespace or control characters. The dict's order is the vocabulary order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merges() -> list[str]:
    """The 48,894 merge rules CLIP uses (the file holds more; CLIP keeps the first ones)."""
    raw = resources.files("underpaint.models").joinpath("data", _BPE_RESOURCE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 1 + NUM_MERGES]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ModelError(f"the shipped {_BPE_RESOURCE} is damaged: expected {NUM_MERGES} merge lines")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token → id in CLIP's order: bytes, bytes + '</w>', merged pairs, then BOS and EOS."""
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def tokenizer_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding ``vocab.json`` and ``merges.txt``, written on first use, reused after."""
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if _complete(folder):
        return folder
    merges = read_merges()
    vocab = build_vocab(merges)
    if len(vocab) != VOCAB_SIZE:
        raise ModelError(f"rebuilt CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
        _write_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False))
        _write_atomic(folder / "checksum.txt", _checksum(folder))
    except OSError:
        if cache_dir is not None:
            raise
        return tokenizer_files(tempfile.mkdtemp(prefix="underpaint-clip-"))
    return folder


def clip_tokenizer(pad_token: str = PAD_EOS, *, folder: str | os.PathLike | None = None):
    """A ``transformers.CLIPTokenizer`` for the shipped vocabulary (or a diffusers ``tokenizer/`` folder).

    ``model_max_length`` is fixed at 77, or padding to the maximum length would not know where
    to stop.
    """
    from transformers import CLIPTokenizer

    source = Path(folder) if folder is not None else tokenizer_files()
    try:
        tok = CLIPTokenizer.from_pretrained(str(source), pad_token=pad_token, model_max_length=MAX_LENGTH,
                                            local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{source}: cannot build a CLIP tokenizer ({exc})") from None
    return tok


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "underpaint" / "clip-tokenizer"


def _checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def _complete(folder: Path) -> bool:
    """True when both files exist and match the checksum written after them (no half-written cache)."""
    try:
        return (folder / "checksum.txt").read_text() == _checksum(folder)
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    from ..imageio.metadata import write_atomic

    write_atomic(path, text.encode("utf-8"), overwrite=True)
