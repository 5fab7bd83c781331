"""The offline CLIP tokenizer rebuilt from the shipped BPE file, against known CLIP token ids."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources

import pytest

from underpaint.models.tokenizer import (BOS_ID, EOS_ID, NUM_MERGES, VOCAB_SIZE, byte_to_unicode, clip_tokenizer,
                                         tokenizer_files)


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


# Ids from OpenAI CLIP's tokenizer (identical in openai/clip-vit-large-patch14's tokenizer).
@pytest.mark.parametrize(("text", "ids"), [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("A Photo of a CAT", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("hello, world!", [49406, 3306, 267, 1002, 256, 49407]),
    ("a dog", [49406, 320, 1929, 49407]),
    ("", [49406, 49407]),
])
def test_known_ids(tok, text, ids):
    assert tok(text).input_ids == ids


def test_special_tokens_and_sizes(tok):
    assert len(tok) == VOCAB_SIZE == 49408
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", BOS_ID) == ("<|startoftext|>", 49406)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", EOS_ID) == ("<|endoftext|>", 49407)
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77
    padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_bang_padding_for_openclip_encoders():
    """SD2 and SDXL's second encoder pad with '!' (id 0), as diffusers' configs and A1111 do."""
    tok = clip_tokenizer("!")
    assert tok.pad_token_id == 0
    padded = tok("a photo", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 1125, 49407] and set(padded[4:]) == {0}


def test_truncation_to_77(tok):
    ids = tok("cat " * 100, truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_rebuilt_files_follow_the_bpe_source(tmp_path):
    folder = tokenizer_files(tmp_path / "cache")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    raw = gzip.decompress(resources.files("underpaint.models").joinpath("data/bpe_simple_vocab_16e6.txt.gz")
                          .read_bytes()).decode("utf-8").split("\n")
    assert merges[0] == "#version: 0.2"
    assert merges[1:] == raw[1:48895] and len(merges) - 1 == NUM_MERGES == 48894
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    chars = list(byte_to_unicode().values())
    assert len(set(chars)) == 256 and chars[0] == "!" and vocab["!"] == 0
    assert vocab["a</w>"] == 256 + chars.index("a") == 320
    assert vocab[raw[1].replace(" ", "")] == 512  # first merge "i n" → "in"
    assert vocab[raw[48894].replace(" ", "")] == 49405
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert all(re.fullmatch(r"\S+ \S+", m) for m in merges[1:])


def test_cache_is_reused_and_repaired(tmp_path):
    folder = tokenizer_files(tmp_path / "c")
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert tokenizer_files(tmp_path / "c") == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp
    (folder / "merges.txt").write_text("#version: 0.2\ni n\n")  # a half-written cache
    tokenizer_files(tmp_path / "c")
    assert len((folder / "merges.txt").read_text().splitlines()) == 48895


def test_tokenizer_from_a_diffusers_folder(tmp_path, tok):
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    again = clip_tokenizer("!", folder=tmp_path / "tokenizer")
    assert again("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert again.pad_token_id == 0
